// pybind11 bindings: the private module mixtral_ext._C. The only place that
// converts Python objects; mixtral_ext/ wraps it in the public API.
// C++ errors become the classes of mixtral_ext.errors (looked up at raise time).
// Long calls (weight copies, forward passes) release the GIL; a CPU engine's collectives take it
// back to call torch.distributed (PythonCommunicator).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "bindings/bindings.h"
#include "core/cuda_library.h"
#include "cpu/cpu_backend.h"
#include "engine/engine.h"

namespace py = pybind11;
using namespace mixtral;

namespace mixtral {

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float16") return DType::kFloat16;
  throw ShapeError("unsupported dtype '" + name + "' (float32, bfloat16 or float16)");
}

DType parse_weight_dtype(const std::string& name, DType fallback) {
  if (name.empty()) return fallback;
  if (name == "float8_e4m3") return DType::kFloat8E4M3;
  return name == "int4" ? DType::kInt4 : parse_dtype(name);
}

std::unique_ptr<Backend> make_backend(const std::string& device, const std::string& cuda_library) {
  if (device == "cpu") return std::make_unique<CpuBackend>();
  MX_CHECK(device == "cuda", Error, "unknown device '" << device << "' (cpu or cuda)");
  MX_CHECK(!cuda_library.empty(), Error, "device 'cuda': this build has no CUDA backend library");
  return create_cuda_backend(cuda_library, 0);
}

}  // namespace mixtral

namespace {

// A CPU engine's communicator: all_reduce(array) of a Python object (mixtral_ext/parallel.py: gloo
// through torch.distributed) sums a float32 numpy view of the tensor, in place, over the ranks.
class PythonCommunicator : public Communicator {
 public:
  PythonCommunicator(int rank, int world_size, py::object all_reduce)
      : rank_(rank), world_size_(world_size), all_reduce_(std::move(all_reduce)) {}
  ~PythonCommunicator() override {
    py::gil_scoped_acquire gil;
    all_reduce_ = py::object();
  }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  void all_reduce_sum(Tensor& t) override {
    MX_CHECK(t.device == Device::kCpu && t.dtype == DType::kFloat32 && t.contiguous(), ShapeError,
             "all_reduce_sum: the CPU communicator sums contiguous float32 host tensors, got " << t.describe());
    py::gil_scoped_acquire gil;
    try {
      all_reduce_(py::array_t<float>({t.numel()}, {sizeof(float)}, t.ptr<float>(), py::none()));
    } catch (py::error_already_set& e) {  // its message, without the traceback what() appends
      throw CollectiveError("all-reduce over " + std::to_string(world_size_) + " ranks failed on rank " +
                            std::to_string(rank_) + ": " + py::str(e.value()).cast<std::string>());
    }
  }

 private:
  int rank_, world_size_;
  py::object all_reduce_;
};

void raise_as(const char* python_class, const std::exception& error) {
  py::object cls = py::module_::import("mixtral_ext.errors").attr(python_class);
  PyErr_SetString(cls.ptr(), error.what());
}

py::array_t<float> append(Engine& engine, int sequence, const py::array_t<int32_t, py::array::c_style>& tokens,
                          bool all_logits) {
  MX_CHECK(tokens.ndim() == 1, ShapeError, "token ids must be a 1-D list, got " << tokens.ndim() << " dims");
  const int64_t n = tokens.shape(0);
  const int64_t vocab = engine.config().vocab_size;
  py::array_t<float> logits = all_logits ? py::array_t<float>({n, vocab}) : py::array_t<float>({vocab});
  const int32_t* ids = tokens.data();
  float* out = logits.mutable_data();
  {
    py::gil_scoped_release release;
    engine.append(sequence, ids, n, all_logits, out);
  }
  return logits;
}

void load_weight(Engine& engine, const std::string& slot, int64_t layer, int64_t expert, int64_t row_offset,
                 const py::buffer& source, const std::string& source_dtype,
                 const std::optional<py::array_t<float, py::array::c_style | py::array::forcecast>>& row_scales) {
  const py::buffer_info info = source.request();
  MX_CHECK(info.ndim == 1 || info.ndim == 2, ShapeError,
           slot << ": expected a 1-D or 2-D tensor, got " << info.ndim << " dims");
  const DType dtype = parse_weight_dtype(source_dtype, DType::kFloat32);
  MX_CHECK(static_cast<size_t>(info.itemsize) == dtype_size(dtype), ShapeError,
           slot << ": " << info.itemsize << "-byte elements do not hold " << source_dtype);
  const int64_t rows = info.ndim == 2 ? info.shape[0] : 1;
  const int64_t cols = info.shape[info.ndim - 1];
  MX_CHECK(info.strides[info.ndim - 1] == info.itemsize && (info.ndim == 1 || info.strides[0] == cols * info.itemsize),
           ShapeError, slot << ": the source tensor must be C-contiguous");
  MX_CHECK((dtype == DType::kFloat8E4M3) == row_scales.has_value() && (!row_scales || row_scales->size() == rows),
           ShapeError, slot << ": a float8_e4m3 source takes one scale per row, other dtypes none");
  py::gil_scoped_release release;
  engine.load_weight(slot, layer, expert, row_offset, info.ptr, dtype, rows, cols,
                     row_scales ? row_scales->data() : nullptr);
}

// An int4 block as the checkpoint readers give it (python/mixtral_ext/int4.py): packed codes uint8
// [rows, cols / 2], scales and zeros float32 [rows, groups], column_groups int32 [cols] or None.
void load_weight_int4(Engine& engine, const std::string& slot, int64_t layer, int64_t expert, int64_t row_offset,
                      const py::array_t<uint8_t, py::array::c_style>& packed,
                      const py::array_t<float, py::array::c_style | py::array::forcecast>& scales,
                      const py::array_t<float, py::array::c_style | py::array::forcecast>& zeros,
                      const std::optional<py::array_t<int32_t, py::array::c_style | py::array::forcecast>>& column_groups) {
  MX_CHECK(packed.ndim() == 2 && scales.ndim() == 2, ShapeError,
           slot << ": int4 packed codes and scales must be 2-D, got " << packed.ndim() << " and " << scales.ndim()
                << " dims");
  const int64_t rows = packed.shape(0), cols = 2 * packed.shape(1);
  MX_CHECK(scales.shape(0) == rows && zeros.ndim() == 2 && zeros.shape(0) == rows && zeros.shape(1) == scales.shape(1),
           ShapeError, slot << ": int4 scales and zeros must both be [" << rows << ", groups]");
  MX_CHECK(scales.shape(1) == engine.int4_groups_of(slot), ShapeError,
           slot << ": " << scales.shape(1) << " groups a row, the engine's int4 group size makes "
                << engine.int4_groups_of(slot));
  MX_CHECK(!column_groups || (column_groups->ndim() == 1 && column_groups->shape(0) == cols), ShapeError,
           slot << ": column groups must be one per input column (" << cols << ")");
  py::gil_scoped_release release;
  engine.load_weight_int4(slot, layer, expert, row_offset, packed.data(), rows, cols, scales.data(), zeros.data(),
                          column_groups ? column_groups->data() : nullptr);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mixtral_ext core (C++): engine, operations, KV cache manager";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const TokenError& e) {
      raise_as("TokenError", e);
    } catch (const ContextOverflowError& e) {
      raise_as("ContextOverflowError", e);
    } catch (const KvCacheFullError& e) {
      raise_as("KvCacheFullError", e);
    } catch (const ShapeError& e) {
      raise_as("ShapeError", e);
    } catch (const DeviceOutOfMemoryError& e) {
      raise_as("DeviceOutOfMemoryError", e);
    } catch (const DeviceError& e) {
      raise_as("DeviceError", e);
    } catch (const CollectiveError& e) {
      raise_as("WorkerError", e);
    } catch (const Error& e) {
      raise_as("MixtralError", e);
    } catch (const std::bad_alloc& e) {
      raise_as("DeviceOutOfMemoryError", e);
    }
  });

  py::class_<ModelConfig>(m, "ModelConfig")
      .def(py::init<>())
      .def_readwrite("vocab_size", &ModelConfig::vocab_size)
      .def_readwrite("hidden_size", &ModelConfig::hidden_size)
      .def_readwrite("intermediate_size", &ModelConfig::intermediate_size)
      .def_readwrite("num_layers", &ModelConfig::num_layers)
      .def_readwrite("num_heads", &ModelConfig::num_heads)
      .def_readwrite("num_kv_heads", &ModelConfig::num_kv_heads)
      .def_readwrite("head_dim", &ModelConfig::head_dim)
      .def_readwrite("num_experts", &ModelConfig::num_experts)
      .def_readwrite("experts_per_token", &ModelConfig::experts_per_token)
      .def_readwrite("rope_theta", &ModelConfig::rope_theta)
      .def_readwrite("rms_norm_eps", &ModelConfig::rms_norm_eps)
      .def_readwrite("max_position_embeddings", &ModelConfig::max_position_embeddings)
      .def("validate", &ModelConfig::validate);

  // Before Engine, whose create_sampler takes it (so signatures and stubs name the Python type).
  py::class_<SamplingParams>(m, "SamplingParams")
      .def(py::init<>())
      .def_readwrite("temperature", &SamplingParams::temperature)
      .def_readwrite("top_k", &SamplingParams::top_k)
      .def_readwrite("top_p", &SamplingParams::top_p)
      .def_readwrite("min_p", &SamplingParams::min_p)
      .def_readwrite("repetition_penalty", &SamplingParams::repetition_penalty)
      .def_readwrite("presence_penalty", &SamplingParams::presence_penalty)
      .def_readwrite("frequency_penalty", &SamplingParams::frequency_penalty)
      .def_readwrite("logprobs", &SamplingParams::logprobs)
      .def("validate", &SamplingParams::validate)
      .def(py::pickle(  // a sharded engine's ranks receive their samplers' settings pickled
          [](const SamplingParams& p) {
            return py::make_tuple(p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                                  p.frequency_penalty, p.logprobs);
          },
          [](const py::tuple& t) {
            MX_CHECK(t.size() == 8, Error, "SamplingParams: 8 pickled fields expected, got " << t.size());
            SamplingParams p;
            p.temperature = t[0].cast<float>();
            p.top_k = t[1].cast<int>();
            p.top_p = t[2].cast<float>();
            p.min_p = t[3].cast<float>();
            p.repetition_penalty = t[4].cast<float>();
            p.presence_penalty = t[5].cast<float>();
            p.frequency_penalty = t[6].cast<float>();
            p.logprobs = t[7].cast<int>();
            return p;
          }));

  py::class_<ThreadTuner>(m, "ThreadTuner", "The CPU's thread count chosen by timing decode steps (cpu/thread_tuner.h).")
      .def(py::init<int>(), py::arg("max_threads"))
      .def_property_readonly("threads", &ThreadTuner::threads, "for the next decode step")
      .def_property_readonly("best", &ThreadTuner::best, "for other work")
      .def("record", &ThreadTuner::record, py::arg("seconds"), "the step just run at `threads` took this long")
      .def("other_work_ran", &ThreadTuner::other_work_ran, "work other than a decode step ran, at `best` threads")
      .def_property_readonly_static("available_threads", [](py::object) { return ThreadTuner::available_threads(); })
      .def_property_readonly_static("max_wait", [](py::object) { return ThreadTuner::kMaxWait; },
                                    "the most steps between two tries of a count");

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const ModelConfig& config, const std::string& device,
                       const std::string& weight_dtype, const std::string& activation_dtype,
                       int64_t max_context, int64_t kv_cache_tokens, int page_size,
                       int64_t max_batch_tokens, const std::string& cuda_library, bool graphs,
                       const std::string& expert_dtype, int num_threads, int64_t int4_group_size,
                       int64_t first_expert, int64_t held_experts, bool int4_act_order) {
             EngineOptions options;
             options.int4_act_order = int4_act_order;
             options.first_expert = first_expert;
             options.held_experts = held_experts;
             options.int4_group_size = int4_group_size;
             options.weight_dtype = parse_dtype(weight_dtype);
             options.expert_dtype = parse_weight_dtype(expert_dtype, options.weight_dtype);
             options.activation_dtype = parse_dtype(activation_dtype);
             options.max_context = max_context;
             options.kv_cache_tokens = kv_cache_tokens;
             options.page_size = page_size;
             options.max_batch_tokens = max_batch_tokens;
             options.graphs = graphs;
             options.num_threads = num_threads;
             return std::make_unique<Engine>(config, options, make_backend(device, cuda_library));
           }),
           py::arg("config"), py::arg("device"), py::arg("weight_dtype"), py::arg("activation_dtype"),
           py::arg("max_context"), py::arg("kv_cache_tokens"), py::arg("page_size"),
           py::arg("max_batch_tokens"), py::arg("cuda_library") = "", py::arg("graphs") = false,
           py::arg("expert_dtype") = "", py::arg("num_threads") = 0,
           py::arg("int4_group_size") = kInt4QuantizeGroupSize, py::arg("first_expert") = 0,
           py::arg("held_experts") = 0, py::arg("int4_act_order") = false,
           "held_experts > 0: the engine holds experts [first_expert, first_expert + held_experts) only (an\n"
           "expert-parallel rank); load_weight takes the model's expert ids. int4_act_order: int4 blocks\n"
           "may come with act order (the workspace holds inputs in column order).")
      .def_static("memory_plan", [](const ModelConfig& config, const std::string& weight_dtype,
                                    const std::string& activation_dtype, int64_t max_context, int page_size,
                                    int64_t max_batch_tokens, const std::string& expert_dtype,
                                    int64_t int4_group_size, int64_t held_experts, bool int4_act_order) {
        EngineOptions options;
        options.int4_act_order = int4_act_order;
        options.held_experts = held_experts;
        options.int4_group_size = int4_group_size;
        options.weight_dtype = parse_dtype(weight_dtype);
        options.expert_dtype = parse_weight_dtype(expert_dtype, options.weight_dtype);
        options.activation_dtype = parse_dtype(activation_dtype);
        options.max_context = options.kv_cache_tokens = max_context;
        options.page_size = page_size;
        options.max_batch_tokens = max_batch_tokens;
        const Engine::MemoryPlan plan = Engine::memory_plan(config, options);
        return py::make_tuple(plan.weight_bytes, plan.workspace_bytes, plan.kv_bytes_per_token);
      }, py::arg("config"), py::arg("weight_dtype"), py::arg("activation_dtype"), py::arg("max_context"),
         py::arg("page_size"), py::arg("max_batch_tokens"), py::arg("expert_dtype") = "",
         py::arg("int4_group_size") = kInt4QuantizeGroupSize, py::arg("held_experts") = 0,
         py::arg("int4_act_order") = false,
         "(weight bytes, workspace bytes, KV cache bytes per token) of an engine with these settings.")
      .def("set_communicator", [](Engine& e, int rank, int world_size, py::object all_reduce) {
        MX_CHECK(e.backend().device() == Device::kCpu, Error,
                 "set_communicator: a Python all-reduce serves CPU engines; a GPU one joins NCCL (join_communicator)");
        e.set_communicator(std::make_shared<PythonCommunicator>(rank, world_size, std::move(all_reduce)));
      }, py::arg("rank"), py::arg("world_size"), py::arg("all_reduce"),
         "Makes this CPU engine rank `rank` of a sharded model: all_reduce(float32 array) sums the array over "
         "the ranks in place.")
      .def("new_communicator_id", [](Engine& e, const std::string& nccl_library) {
        return py::bytes(e.backend().new_communicator_id(nccl_library));
      }, py::arg("nccl_library"), "A new group id of the backend's collectives (NCCL's), made by rank 0.")
      .def("join_communicator", [](Engine& e, const std::string& nccl_library, const py::bytes& id, int rank,
                                   int world_size) {
        const std::string id_bytes = id;
        py::gil_scoped_release release;
        e.set_communicator(e.backend().create_communicator(nccl_library, id_bytes, rank, world_size));
      }, py::arg("nccl_library"), py::arg("id"), py::arg("rank"), py::arg("world_size"),
         "Makes this GPU engine rank `rank` of a sharded model in the group of `id`; returns once all ranks joined.")
      .def("abort_communicator", [](Engine& e) {
        if (const std::shared_ptr<Communicator> communicator = e.communicator()) communicator->abort();
      }, py::call_guard<py::gil_scoped_release>(),
         "From any thread, when a rank is gone: the collectives waiting for it fail instead of hanging.")
      .def("set_backend_option", [](Engine& e, const std::string& name, const std::string& value) {
        e.backend().set_option(name, value);
      })
      .def("load_weight", &load_weight, py::arg("slot"), py::arg("layer"), py::arg("expert"),
           py::arg("row_offset"), py::arg("source"), py::arg("source_dtype"), py::arg("row_scales") = py::none())
      .def("load_weight_int4", &load_weight_int4, py::arg("slot"), py::arg("layer"), py::arg("expert"),
           py::arg("row_offset"), py::arg("packed"), py::arg("scales"), py::arg("zeros"),
           py::arg("column_groups") = py::none(),
           "An int4 block as it is stored (core/int4.h): packed codes uint8 [rows, cols / 2], scales and zeros "
           "[rows, groups], each input column's group (act order) or None.")
      .def("missing_weights", &Engine::missing_weights)
      .def("init_random", [](Engine& e, uint64_t seed) {
        py::gil_scoped_release release;
        e.init_random(seed);
      }, py::arg("seed"))
      .def_property_readonly("weight_bytes", &Engine::weight_bytes)
      .def_property_readonly("expert_dtype", [](const Engine& e) { return std::string(dtype_name(e.options().expert_dtype)); })
      .def_property_readonly("kv_cache_bytes", &Engine::kv_cache_bytes)
      .def_property_readonly("workspace_bytes", &Engine::workspace_bytes)
      .def("memory_info", [](Engine& e) {
        const MemoryInfo info = e.backend().memory_info();
        return py::make_tuple(info.free_bytes, info.total_bytes);
      }, "(free, total) bytes of the engine's device now")
      .def_property_readonly("device", [](Engine& e) { return e.backend().name(); })
      .def_property_readonly("num_threads", &Engine::num_threads)
      .def_property_readonly("num_pages", [](const Engine& e) { return e.kv_cache().num_pages(); })
      .def_property_readonly("free_pages", [](const Engine& e) { return e.kv_cache().free_pages(); })
      .def_property_readonly("page_size", [](const Engine& e) { return e.kv_cache().page_size(); })
      .def_property_readonly("num_sequences", [](const Engine& e) { return e.kv_cache().num_sequences(); })
      .def("create_sequence", &Engine::create_sequence)
      .def("release_sequence", &Engine::release_sequence, py::call_guard<py::gil_scoped_release>())
      .def("truncate_sequence", &Engine::truncate_sequence, py::call_guard<py::gil_scoped_release>())
      .def("sequence_length", &Engine::sequence_length)
      .def("append", &append, py::arg("sequence"), py::arg("tokens"), py::arg("all_logits"))
      .def("create_sampler", [](Engine& e, const SamplingParams& params, uint64_t seed,
                                const py::array_t<int32_t, py::array::c_style>& prompt) {
        return e.create_sampler(params, seed, prompt.data(), prompt.size());
      }, py::arg("params"), py::arg("seed"), py::arg("prompt"))
      .def("release_sampler", &Engine::release_sampler, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("num_samplers", &Engine::num_samplers)
      .def("append_sample", [](Engine& e, int sequence, const py::array_t<int32_t, py::array::c_style>& tokens,
                               int sampler) {
        MX_CHECK(tokens.ndim() == 1, ShapeError, "token ids must be a 1-D list");
        const int32_t* ids = tokens.data();
        const int64_t n = tokens.shape(0);
        SampledToken t;
        {
          py::gil_scoped_release release;
          t = e.append_sample(sequence, ids, n, sampler);
        }
        return py::make_tuple(t.token, t.logprob, t.top_tokens, t.top_logprobs);
      }, py::arg("sequence"), py::arg("tokens"), py::arg("sampler"),
         "Runs the tokens, then samples the next one on the device: (token, logprob, top_ids, top_logprobs).")
      .def("decode_next", [](Engine& e, int sequence, int sampler, bool queue_ahead) {
        SampledToken t;
        {
          py::gil_scoped_release release;
          t = e.decode_next(sequence, sampler, queue_ahead);
        }
        return py::make_tuple(t.token, t.logprob, t.top_tokens, t.top_logprobs);
      }, py::arg("sequence"), py::arg("sampler"), py::arg("queue_ahead"),
         "The next decode step of the sampler's last token (pipelined; see engine.h): the tuple of append_sample.");

  bind_ops(m);

  m.def("device_memory", [](const std::string& device, const std::string& cuda_library) {
    const MemoryInfo info = make_backend(device, cuda_library)->memory_info();
    return py::make_tuple(info.free_bytes, info.total_bytes);
  }, py::arg("device"), py::arg("cuda_library") = "", "(free, total) bytes of a device, before any engine is made");

  m.def("probe_cuda", [](const std::string& library_path) {
    CudaProbe probe = probe_cuda_library(library_path);
    return py::make_tuple(probe.device_count, probe.summary);
  }, py::arg("library_path"),
        "Loads the CUDA backend library and returns (device_count, summary); -1 when unusable.");
}
