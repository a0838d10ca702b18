# The CUDA backend's sources, the one list that both builds use: the extension's (CMakeLists.txt,
# compiled by nvcc) and the CUDA emulator's (tests/cuda_emulator/CMakeLists.txt, compiled as C++).
# Every .cu file in csrc/cuda/ is its own translation unit in both.
#   mixtral_ext_cuda_sources   csrc/cuda/*.cu
#   mixtral_ext_cuda_headers   csrc/cuda/*.cuh and csrc/core/*.h, which the sources include
get_filename_component(mixtral_ext_csrc "${CMAKE_CURRENT_LIST_DIR}/../csrc" ABSOLUTE)
file(GLOB mixtral_ext_cuda_sources CONFIGURE_DEPENDS "${mixtral_ext_csrc}/cuda/*.cu")
file(GLOB mixtral_ext_cuda_headers CONFIGURE_DEPENDS "${mixtral_ext_csrc}/cuda/*.cuh" "${mixtral_ext_csrc}/core/*.h")
