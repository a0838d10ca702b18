# Sets cublas_wheel_dir to the folder of the nvidia-cublas wheel in the Python environment of
# Python_EXECUTABLE (nvidia/cu13, or nvidia/cublas of older wheels; include/ and lib/ inside),
# or to nothing when it has none.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import importlib.util as u, os\nfor name in ('nvidia.cu13', 'nvidia.cublas'):\n    try:\n        spec = u.find_spec(name)\n    except ImportError:\n        continue\n    if spec and spec.submodule_search_locations:\n        print(list(spec.submodule_search_locations)[0]); break"
  OUTPUT_VARIABLE cublas_wheel_dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
