// mixtral_ext._C.Ops: each operation of core/backend.h callable on its own,
// on the CPU or the CUDA backend, for the tests that hold every CUDA op to its
// CPU twin. Inputs come as float32 / int32 numpy arrays and are converted to
// the requested dtype on the host (expert weights may also be quantized to
// float8_e4m3 with their row scales, core/fp8.h, or to int4 in groups, core/int4.h, or
// given as int4 codes, scales and zeros); outputs come back as float32
// / int32 numpy arrays. Every device buffer has guard bytes on both sides,
// checked after the op; outputs start filled with 0xFF bytes (NaN in every
// float dtype), so a missed write shows. Indices are range-checked on the host
// before any backend reads them (the CUDA kernels trust the engine's checks).
// The time_* methods time one op on uninitialised buffers of given sizes, for
// benchmarks; quantize_fp8 and quantize_int4 expose the quantizers themselves.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <optional>
#include <vector>

#include "bindings/bindings.h"

namespace py = pybind11;

namespace mixtral {

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

constexpr size_t kGuardBytes = 256;
constexpr unsigned char kGuard = 0xA5;

std::vector<int64_t> shape_of(const py::array& a) { return std::vector<int64_t>(a.shape(), a.shape() + a.ndim()); }

Tensor make_tensor(void* data, DType dtype, Device device, const std::vector<int64_t>& shape) {
  MX_CHECK(!shape.empty() && shape.size() <= size_t(kMaxDims), ShapeError, "Ops: 1 to 4 dims expected");
  Tensor t(data, dtype, device, {1});
  t.ndim = static_cast<int>(shape.size());
  int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.shape[d] = shape[d];
    t.strides[d] = stride;
    stride *= shape[d];
  }
  return t;
}

void check_range(const IntArray& a, int64_t low, int64_t high, const char* what) {
  for (py::ssize_t i = 0; i < a.size(); ++i)
    MX_CHECK(a.data()[i] >= low && a.data()[i] < high, ShapeError,
             what << " " << a.data()[i] << " at index " << i << " outside [" << low << ", " << high << ")");
}

// The buffers of one op call on one backend, each between two guard zones.
class Buffers {
 public:
  explicit Buffers(Backend& backend) : backend_(backend) {}
  ~Buffers() {
    for (void* base : bases_) backend_.release(base);
  }

  Tensor input(const FloatArray& a, DType dtype) {
    std::vector<char> converted(a.size() * dtype_size(dtype));
    convert_host(a.data(), DType::kFloat32, converted.data(), dtype, a.size());
    return place(converted.data(), dtype, shape_of(a));
  }
  Tensor input(const IntArray& a) { return place(a.data(), DType::kInt32, shape_of(a)); }
  // Expert weights [E, N, K]: in `dtype`, quantized to float8_e4m3 with their row scales, or to
  // int4 in groups of kInt4QuantizeGroupSize columns.
  Tensor expert_weights(const FloatArray& w, DType dtype) {
    if (dtype == DType::kInt4) {
      MX_CHECK(w.ndim() == 3, ShapeError, "int4 expert weights must be [E, N, K]");
      const int64_t rows = w.shape(0) * w.shape(1), cols = w.shape(2);
      const int64_t groups = int4_groups(cols, kInt4QuantizeGroupSize);
      std::vector<uint8_t> packed(rows * cols / 2), zeros(rows * groups);
      std::vector<uint16_t> scales(rows * groups);
      quantize_rows_int4(w.data(), rows, cols, kInt4QuantizeGroupSize, packed.data(), scales.data(), zeros.data());
      return place_int4(packed, scales, zeros, nullptr, shape_of(w), kInt4QuantizeGroupSize, 1);
    }
    if (dtype != DType::kFloat8E4M3) return input(w, dtype);
    const int64_t cols = w.shape(w.ndim() - 1), rows = cols ? w.size() / cols : 0;
    std::vector<uint8_t> values(w.size());
    std::vector<float> scales(rows);
    quantize_rows_fp8(w.data(), rows, cols, values.data(), scales.data());
    Tensor t = place(values.data(), DType::kFloat8E4M3, shape_of(w));
    t.row_scales = place(scales.data(), DType::kFloat32, {rows}).ptr<const float>();
    return t;
  }
  // int4 expert weights [E, N, K] from their parts: packed codes, float16 scale bits and zeros
  // [E * N, groups], and the column orders [E, segments, K] or null (core/int4.h).
  Tensor place_int4(const std::vector<uint8_t>& packed, const std::vector<uint16_t>& scales,
                    const std::vector<uint8_t>& zeros, const int32_t* input_order, const std::vector<int64_t>& shape,
                    int64_t group_size, int64_t segments) {
    Tensor t = place(packed.data(), DType::kInt4, shape);
    const int64_t groups = int64_t(scales.size());
    t.int4.scales = place(scales.data(), DType::kFloat16, {groups}).ptr<const uint16_t>();
    t.int4.zeros = place(zeros.data(), DType::kInt4, {2 * groups}).ptr<const uint8_t>();  // bytes: 2 int4 each
    if (input_order)
      t.int4.input_order = place(input_order, DType::kInt32, {shape[0] * segments * shape[2]}).ptr<const int32_t>();
    t.int4.group_size = static_cast<int32_t>(group_size);
    t.int4.segments = static_cast<int32_t>(segments);
    return t;
  }
  Tensor output(DType dtype, const std::vector<int64_t>& shape) { return place(nullptr, dtype, shape); }

  FloatArray to_float(const Tensor& t) {
    std::vector<char> raw(t.nbytes());
    backend_.copy_to_host(raw.data(), t.data, raw.size());
    FloatArray out(std::vector<py::ssize_t>(t.shape.begin(), t.shape.begin() + t.ndim));
    convert_host(raw.data(), t.dtype, out.mutable_data(), DType::kFloat32, t.numel());
    return out;
  }
  IntArray to_int(const Tensor& t) {
    IntArray out(std::vector<py::ssize_t>(t.shape.begin(), t.shape.begin() + t.ndim));
    backend_.copy_to_host(out.mutable_data(), t.data, t.nbytes());
    return out;
  }

  // Throws if any guard byte changed.
  void check_guards() {
    for (size_t i = 0; i < bases_.size(); ++i) {
      std::vector<unsigned char> guard(kGuardBytes);
      for (size_t side = 0; side < 2; ++side) {
        const size_t offset = side == 0 ? 0 : kGuardBytes + sizes_[i];
        backend_.copy_to_host(guard.data(), static_cast<char*>(bases_[i]) + offset, kGuardBytes);
        for (unsigned char byte : guard)
          MX_CHECK(byte == kGuard, Error,
                   backend_.name() << ": an op wrote " << (side == 0 ? "before" : "after") << " buffer " << i);
      }
    }
  }

 private:
  Tensor place(const void* host, DType dtype, const std::vector<int64_t>& shape) {
    Tensor t = make_tensor(nullptr, dtype, backend_.device(), shape);
    const size_t bytes = t.nbytes();
    std::vector<unsigned char> image(bytes + 2 * kGuardBytes, kGuard);
    if (host) std::memcpy(image.data() + kGuardBytes, host, bytes);
    else std::memset(image.data() + kGuardBytes, 0xFF, bytes);
    void* base = backend_.allocate(image.size());
    bases_.push_back(base);
    sizes_.push_back(bytes);
    backend_.copy_from_host(base, image.data(), image.size());
    t.data = static_cast<char*>(base) + kGuardBytes;
    return t;
  }

  Backend& backend_;
  std::vector<void*> bases_;
  std::vector<size_t> sizes_;
};

// Output buffers of a routing of `tokens` rows of width `hidden` over `experts`, k each.
Routing routing_outputs(Buffers& b, int64_t tokens, int64_t hidden, int64_t experts, int k, DType dtype) {
  return Routing{b.output(DType::kFloat32, {tokens, experts}), b.output(DType::kInt32, {tokens, k}),
                 b.output(DType::kFloat32, {tokens, k}),      b.output(DType::kInt32, {experts + 1}),
                 b.output(DType::kInt32, {tokens * k}),       b.output(DType::kInt32, {tokens * k}),
                 b.output(dtype, {tokens * k, hidden})};
}

// (logits, expert_ids, weights, expert_offsets, permuted_to_expanded, expanded_to_permuted, gathered)
py::tuple routing_to_tuple(Buffers& b, const Routing& r) {
  return py::make_tuple(b.to_float(r.logits), b.to_int(r.expert_ids), b.to_float(r.weights),
                        b.to_int(r.expert_offsets), b.to_int(r.permuted_to_expanded),
                        b.to_int(r.expanded_to_permuted), b.to_float(r.gathered));
}

KvLayer kv_layer(const Tensor& k_pool, const Tensor& v_pool) {
  MX_CHECK(k_pool.ndim == 4 && v_pool.ndim == 4 && k_pool.shape == v_pool.shape, ShapeError,
           "Ops: k and v pools must both be [num_pages, Hkv, page_size, D]");
  KvLayer kv;
  kv.k = k_pool.data, kv.v = v_pool.data, kv.dtype = k_pool.dtype;
  kv.num_pages = static_cast<int>(k_pool.shape[0]);
  kv.page_size = static_cast<int>(k_pool.shape[2]);
  return kv;
}

void check_pages(const IntArray& positions, const IntArray& page_table, int64_t num_pages, int64_t page_size) {
  check_range(page_table, 0, num_pages, "page");
  check_range(positions, 0, page_table.size() * page_size, "position");
}

// The buffers of an attention operation: qkv [T, (Hq + 2 Hkv) * D], positions [T], the page
// table and the k/v pools [num_pages, Hkv, page_size, D] (positions and table checked against the
// pools first), and an output [T, Hq * D].
struct AttentionInputs {
  AttentionInputs(Buffers& b, const FloatArray& qkv_array, int heads, int kv_heads, int head_dim,
                  const IntArray& position_array, const FloatArray& k_pool, const FloatArray& v_pool,
                  const IntArray& page_table, const std::string& dtype)
      : shape{heads, kv_heads, head_dim} {
    check_pages(position_array, page_table, k_pool.shape(0), k_pool.shape(2));
    const DType d = parse_dtype(dtype);
    qkv = b.input(qkv_array, d), positions = b.input(position_array), table = b.input(page_table);
    k = b.input(k_pool, d), v = b.input(v_pool, d);
    out = b.output(d, {qkv_array.shape(0), int64_t(heads) * head_dim});
  }
  KvLayer kv() const { return kv_layer(k, v); }

  AttentionShape shape;
  Tensor qkv, positions, table, k, v, out;
};

class Ops {
 public:
  Ops(const std::string& device, const std::string& cuda_library) : backend_(make_backend(device, cuda_library)) {}
  Backend& backend() { return *backend_; }

  template <typename Fn>
  auto run(Fn&& fn) {
    Buffers buffers(*backend_);
    auto result = fn(buffers);
    backend_->synchronize();
    buffers.check_guards();
    return result;
  }

 private:
  std::unique_ptr<Backend> backend_;
};

// Device buffers for timing: left uninitialised (the ops' speed does not depend on the
// values), except the index arrays, which are uploaded.
class TimingBuffers {
 public:
  explicit TimingBuffers(Backend& backend) : backend_(backend) {}
  ~TimingBuffers() {
    for (void* p : owned_) backend_.release(p);
  }
  Tensor any(DType dtype, const std::vector<int64_t>& shape) {
    Tensor t = make_tensor(nullptr, dtype, backend_.device(), shape);
    t.data = backend_.allocate(t.nbytes());
    owned_.push_back(t.data);
    return t;
  }
  Tensor ints(const std::vector<int32_t>& values) { return copied(DType::kInt32, values.data(), values.size()); }
  Tensor floats(const FloatArray& values) { return copied(DType::kFloat32, values.data(), values.size()); }
  Tensor copied(DType dtype, const void* values, size_t count) {
    Tensor t = any(dtype, {static_cast<int64_t>(count)});
    backend_.copy_from_host(t.data, values, t.nbytes());
    return t;
  }
  // Mean seconds per call of fn over `iters` calls, after one warm-up call.
  template <typename Fn>
  double seconds(Fn&& fn, int iters) {
    MX_CHECK(iters >= 1, ShapeError, "iters must be >= 1");
    fn();
    backend_.synchronize();
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) fn();
    backend_.synchronize();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
  }

 private:
  Backend& backend_;
  std::vector<void*> owned_;
};

}  // namespace

void bind_ops(py::module_& m) {
  m.def("quantize_fp8", [](const FloatArray& w) {
    MX_CHECK(w.ndim() == 2, ShapeError, "quantize_fp8: a [rows, cols] array expected");
    py::array_t<uint8_t> values({w.shape(0), w.shape(1)});
    FloatArray scales(w.shape(0));
    quantize_rows_fp8(w.data(), w.shape(0), w.shape(1), values.mutable_data(), scales.mutable_data());
    return py::make_tuple(values, scales);
  }, py::arg("w"), "The engine's FP8 quantization of expert weights (core/fp8.h): (E4M3 bytes, row scales).");
  m.def("quantize_int4", [](const FloatArray& w, int64_t group_size) {
    MX_CHECK(w.ndim() == 2 && w.shape(1) % 2 == 0 && group_size >= 1, ShapeError,
             "quantize_int4: a [rows, cols] array with cols even and a positive group size expected");
    const int64_t rows = w.shape(0), cols = w.shape(1), groups = int4_groups(cols, group_size);
    std::vector<uint8_t> packed(rows * cols / 2), zeros(rows * groups);
    std::vector<uint16_t> scale_bits(rows * groups);
    quantize_rows_int4(w.data(), rows, cols, group_size, packed.data(), scale_bits.data(), zeros.data());
    py::array_t<uint8_t> codes({rows, cols});
    FloatArray scales({rows, groups}), zero_points({rows, groups});
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) codes.mutable_data()[r * cols + c] = uint8_t(int4_code(packed.data() + r * (cols / 2), c));
    for (int64_t i = 0; i < rows * groups; ++i) {
      scales.mutable_data()[i] = fp16_to_float(scale_bits[i]);
      zero_points.mutable_data()[i] = zeros[i];
    }
    return py::make_tuple(codes, scales, zero_points);
  }, py::arg("w"), py::arg("group_size") = kInt4QuantizeGroupSize,
     "The engine's int4 quantization of expert weights (core/int4.h): (codes uint8 [rows, cols], scales "
     "(float16 values) and zeros [rows, groups]).");
  py::class_<Ops>(m, "Ops", "Single operations on one backend, for testing the CUDA ops against their CPU twins.")
      .def(py::init<const std::string&, const std::string&>(), py::arg("device"), py::arg("cuda_library") = "")
      .def("set_option", [](Ops& ops, const std::string& name, const std::string& value) {
        ops.backend().set_option(name, value);
      })
      .def("fill_uniform", [](Ops& ops, const std::vector<int64_t>& shape, uint64_t seed, float low, float high,
                              const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          Tensor t = b.output(parse_dtype(dtype), shape);
          ops.backend().fill_uniform(t, seed, low, high);
          return b.to_float(t);
        });
      })
      .def("embedding", [](Ops& ops, const FloatArray& table, const IntArray& ids, const std::string& dtype) {
        check_range(ids, 0, table.shape(0), "token id");
        return ops.run([&](Buffers& b) {
          Tensor t = b.input(table, parse_dtype(dtype)), i = b.input(ids);
          Tensor out = b.output(parse_dtype(dtype), {ids.shape(0), table.shape(1)});
          ops.backend().embedding(t, i, out);
          return b.to_float(out);
        });
      })
      .def("add_rmsnorm", [](Ops& ops, const FloatArray& residual, std::optional<FloatArray> delta,
                             const FloatArray& weight, float eps, const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          const DType d = parse_dtype(dtype);
          Tensor r = b.input(residual, d), w = b.input(weight, d), out = b.output(d, shape_of(residual));
          Tensor dl = delta ? b.input(*delta, d) : Tensor();
          ops.backend().add_rmsnorm(r, delta ? &dl : nullptr, w, eps, out);
          return py::make_tuple(b.to_float(r), b.to_float(out));
        });
      })
      .def("matmul", [](Ops& ops, const FloatArray& x, const FloatArray& w, const std::string& dtype,
                        const std::string& out_dtype) {
        return ops.run([&](Buffers& b) {
          Tensor xt = b.input(x, parse_dtype(dtype)), wt = b.input(w, parse_dtype(dtype));
          Tensor out = b.output(parse_dtype(out_dtype), {x.shape(0), w.shape(0)});
          ops.backend().matmul(xt, wt, out);
          return b.to_float(out);
        });
      })
      .def("rope_kv_append", [](Ops& ops, const FloatArray& qkv, int heads, int kv_heads, int head_dim,
                                const IntArray& positions, float theta, const FloatArray& k_pool,
                                const FloatArray& v_pool, const IntArray& page_table, const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          AttentionInputs in(b, qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, page_table, dtype);
          ops.backend().rope_kv_append(in.qkv, in.shape, in.positions, theta, in.kv(), in.table);
          return py::make_tuple(b.to_float(in.qkv), b.to_float(in.k), b.to_float(in.v));
        });
      })
      .def("rope_attention", [](Ops& ops, const FloatArray& qkv, int heads, int kv_heads, int head_dim,
                                const IntArray& positions, float theta, const FloatArray& k_pool,
                                const FloatArray& v_pool, const IntArray& page_table, const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          AttentionInputs in(b, qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, page_table, dtype);
          ops.backend().rope_attention(in.qkv, in.shape, in.positions, theta, in.kv(), in.table, in.out);
          return py::make_tuple(b.to_float(in.out), b.to_float(in.k), b.to_float(in.v));
        });
      })
      .def("attention", [](Ops& ops, const FloatArray& qkv, int heads, int kv_heads, int head_dim,
                           const IntArray& positions, const FloatArray& k_pool, const FloatArray& v_pool,
                           const IntArray& page_table, const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          AttentionInputs in(b, qkv, heads, kv_heads, head_dim, positions, k_pool, v_pool, page_table, dtype);
          ops.backend().attention(in.qkv, in.shape, in.positions, in.kv(), in.table, in.out);
          return b.to_float(in.out);
        });
      })
      .def("router_topk", [](Ops& ops, const FloatArray& logits, int k) {
        return ops.run([&](Buffers& b) {
          Tensor l = b.input(logits, DType::kFloat32);
          Tensor ids = b.output(DType::kInt32, {logits.shape(0), k}), w = b.output(DType::kFloat32, {logits.shape(0), k});
          ops.backend().router_topk(l, ids, w);
          return py::make_tuple(b.to_int(ids), b.to_float(w));
        });
      })
      .def("moe_permute", [](Ops& ops, const IntArray& expert_ids, int num_experts) {
        check_range(expert_ids, 0, num_experts, "expert id");
        return ops.run([&](Buffers& b) {
          Tensor ids = b.input(expert_ids), offsets = b.output(DType::kInt32, {num_experts + 1});
          Tensor p2e = b.output(DType::kInt32, {expert_ids.size()}), e2p = b.output(DType::kInt32, {expert_ids.size()});
          ops.backend().moe_permute(ids, offsets, p2e, e2p);
          return py::make_tuple(b.to_int(offsets), b.to_int(p2e), b.to_int(e2p));
        });
      })
      .def("route", [](Ops& ops, const FloatArray& x, const FloatArray& router, int k, const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          Tensor xt = b.input(x, parse_dtype(dtype)), rt = b.input(router, parse_dtype(dtype));
          Routing routing = routing_outputs(b, x.shape(0), x.shape(1), router.shape(0), k, parse_dtype(dtype));
          ops.backend().route(xt, rt, routing);
          return routing_to_tuple(b, routing);
        });
      })
      .def("moe", [](Ops& ops, const FloatArray& x, const FloatArray& router, const FloatArray& w13,
                     const FloatArray& w2, int k, const std::string& dtype, const std::string& expert_dtype,
                     int64_t first_expert) {
        return ops.run([&](Buffers& b) {
          const DType dt = parse_dtype(dtype), et = parse_weight_dtype(expert_dtype, dt);
          const int64_t rows = x.shape(0) * int64_t(k), ffn = w2.shape(2);
          Tensor xt = b.input(x, dt), rt = b.input(router, dt);
          Tensor w13t = b.expert_weights(w13, et), w2t = b.expert_weights(w2, et);
          Routing routing = routing_outputs(b, x.shape(0), x.shape(1), router.shape(0), k, dt);
          ExpertBuffers experts{b.output(dt, {rows, 2 * ffn}), b.output(dt, {rows, ffn}),
                                b.output(dt, {rows, w2.shape(1)}), Tensor{}, first_expert};
          ops.backend().moe(xt, rt, w13t, w2t, routing, experts);
          return py::make_tuple(routing_to_tuple(b, routing), b.to_float(experts.gate_up), b.to_float(experts.act),
                                b.to_float(experts.out));
        });
      }, py::arg("x"), py::arg("router"), py::arg("w13"), py::arg("w2"), py::arg("k"), py::arg("dtype"),
         py::arg("expert_dtype") = "", py::arg("first_expert") = 0,
         "w13 and w2 may hold a slice of the router's experts, from first_expert (an expert-parallel rank's)")
      .def("add_rmsnorm_moe", [](Ops& ops, const FloatArray& residual, const FloatArray& delta,
                                 const FloatArray& norm_weight, float eps, const FloatArray& router,
                                 const FloatArray& w13, const FloatArray& w2, int k, const std::string& dtype,
                                 const std::string& expert_dtype, int64_t first_expert) {
        return ops.run([&](Buffers& b) {
          const DType dt = parse_dtype(dtype), et = parse_weight_dtype(expert_dtype, dt);
          const int64_t tokens = residual.shape(0), hidden = residual.shape(1), rows = tokens * k, ffn = w2.shape(2);
          Tensor res = b.input(residual, dt), dl = b.input(delta, dt), nw = b.input(norm_weight, dt);
          Tensor rt = b.input(router, dt), w13t = b.expert_weights(w13, et), w2t = b.expert_weights(w2, et);
          Tensor h = b.output(dt, {tokens, hidden});
          Routing routing = routing_outputs(b, tokens, hidden, router.shape(0), k, dt);
          ExpertBuffers experts{b.output(dt, {rows, 2 * ffn}), b.output(dt, {rows, ffn}), b.output(dt, {rows, hidden}),
                                Tensor{}, first_expert};
          ops.backend().add_rmsnorm_moe(res, dl, nw, eps, h, rt, w13t, w2t, routing, experts);
          return py::make_tuple(b.to_float(res), b.to_float(h), routing_to_tuple(b, routing),
                                b.to_float(experts.gate_up), b.to_float(experts.act), b.to_float(experts.out));
        });
      }, py::arg("residual"), py::arg("delta"), py::arg("norm_weight"), py::arg("eps"), py::arg("router"),
         py::arg("w13"), py::arg("w2"), py::arg("k"), py::arg("dtype"), py::arg("expert_dtype") = "",
         py::arg("first_expert") = 0)
      .def("moe_gather", [](Ops& ops, const FloatArray& x, const IntArray& permuted_to_expanded, int k,
                            const std::string& dtype) {
        check_range(permuted_to_expanded, 0, x.shape(0) * int64_t(k), "expanded row");
        return ops.run([&](Buffers& b) {
          Tensor xt = b.input(x, parse_dtype(dtype)), p2e = b.input(permuted_to_expanded);
          Tensor out = b.output(parse_dtype(dtype), {permuted_to_expanded.size(), x.shape(1)});
          ops.backend().moe_gather(xt, p2e, k, out);
          return b.to_float(out);
        });
      })
      .def("expert_matmul", [](Ops& ops, const FloatArray& x, const FloatArray& w, const IntArray& offsets,
                               const std::string& dtype, const std::string& out_dtype, const std::string& expert_dtype) {
        check_range(offsets, 0, x.shape(0) + 1, "expert offset");
        return ops.run([&](Buffers& b) {
          const DType dt = parse_dtype(dtype);
          Tensor xt = b.input(x, dt), wt = b.expert_weights(w, parse_weight_dtype(expert_dtype, dt));
          Tensor off = b.input(offsets), out = b.output(parse_dtype(out_dtype), {x.shape(0), w.shape(1)});
          ops.backend().expert_matmul(xt, wt, off, out);
          return b.to_float(out);
        });
      }, py::arg("x"), py::arg("w"), py::arg("offsets"), py::arg("dtype"), py::arg("out_dtype"),
         py::arg("expert_dtype") = "")
      .def("expert_matmul_int4", [](Ops& ops, const FloatArray& x,
                                    const py::array_t<uint8_t, py::array::c_style>& packed, const FloatArray& scales,
                                    const FloatArray& zeros, std::optional<IntArray> input_order, int64_t group_size,
                                    const IntArray& offsets, const std::string& dtype) {
        MX_CHECK(packed.ndim() == 3 && group_size >= 1, ShapeError,
                 "expert_matmul_int4: packed codes [E, N, K / 2] and a positive group size expected");
        const int64_t E = packed.shape(0), N = packed.shape(1), K = 2 * packed.shape(2);
        const int64_t groups = int4_groups(K, group_size);
        MX_CHECK(scales.ndim() == 3 && scales.shape(0) == E && scales.shape(1) == N && scales.shape(2) == groups &&
                     zeros.size() == scales.size(), ShapeError,
                 "expert_matmul_int4: scales and zeros [E, N, " << groups << "] expected");
        const int64_t segments = input_order ? input_order->shape(1) : 1;
        if (input_order) {
          MX_CHECK(input_order->ndim() == 3 && input_order->shape(0) == E && input_order->shape(2) == K, ShapeError,
                   "expert_matmul_int4: input_order [E, segments, K] expected");
          check_range(*input_order, 0, K, "input column");
        }
        check_range(offsets, 0, x.shape(0) + 1, "expert offset");
        const std::vector<uint8_t> code_bytes(packed.data(), packed.data() + E * N * K / 2);
        std::vector<uint8_t> zero_bytes(E * N * groups);
        std::vector<uint16_t> scale_bits(E * N * groups);
        for (int64_t i = 0; i < E * N * groups; ++i) {
          scale_bits[i] = float_to_fp16(scales.data()[i]);
          zero_bytes[i] = static_cast<uint8_t>(zeros.data()[i]);
        }
        return ops.run([&](Buffers& b) {
          const DType dt = parse_dtype(dtype);
          Tensor xt = b.input(x, dt), off = b.input(offsets), out = b.output(dt, {x.shape(0), N});
          Tensor wt = b.place_int4(code_bytes, scale_bits, zero_bytes, input_order ? input_order->data() : nullptr,
                                   {E, N, K}, group_size, segments);
          ops.backend().expert_matmul(xt, wt, off, out);
          return b.to_float(out);
        });
      }, py::arg("x"), py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("input_order"),
         py::arg("group_size"), py::arg("offsets"), py::arg("dtype"),
         "expert_matmul of int4 weights given by their parts (core/int4.h): packed codes [E, N, K / 2], scales "
         "(rounded to float16) and zeros [E, N, groups], input_order [E, segments, K] or None.")
      .def("silu_mul", [](Ops& ops, const FloatArray& gate_up, const std::string& dtype) {
        return ops.run([&](Buffers& b) {
          Tensor g = b.input(gate_up, parse_dtype(dtype));
          Tensor out = b.output(parse_dtype(dtype), {gate_up.shape(0), gate_up.shape(1) / 2});
          ops.backend().silu_mul(g, out);
          return b.to_float(out);
        });
      })
      .def("sample", [](Ops& ops, const FloatArray& logits, const SamplingParams& params, uint64_t seed,
                        const IntArray& state) {
        return ops.run([&](Buffers& b) {
          const int64_t n = std::min<int64_t>(params.logprobs, logits.size());
          Tensor l = b.input(logits, DType::kFloat32), s = b.input(state);
          Tensor token = b.output(DType::kInt32, {1}), logprob = b.output(DType::kFloat32, {1});
          Tensor top_ids = b.output(DType::kInt32, {n}), top_logprobs = b.output(DType::kFloat32, {n});
          ops.backend().sample(l, params, seed, s, token, logprob, top_ids, top_logprobs);
          return py::make_tuple(b.to_int(token).at(0), b.to_float(logprob).at(0), b.to_int(top_ids),
                                b.to_float(top_logprobs), b.to_int(s));
        });
      }, "One draw; state [2V + 1] int32 is seen, counts, step. Returns (token, logprob, top_ids, top_logprobs, "
         "state after).")
      // ---- timing: mean seconds per call; inputs of the given sizes left uninitialised, but sampling's logits ----
      .def("time_matmul", [](Ops& ops, int64_t m, int64_t n, int64_t k, const std::string& dtype,
                             const std::string& out_dtype, int iters) {
        TimingBuffers b(ops.backend());
        Tensor x = b.any(parse_dtype(dtype), {m, k}), w = b.any(parse_dtype(dtype), {n, k});
        Tensor out = b.any(parse_dtype(out_dtype), {m, n});
        return b.seconds([&] { ops.backend().matmul(x, w, out); }, iters);
      })
      .def("time_expert_matmul", [](Ops& ops, const std::vector<int32_t>& rows_per_expert, int64_t n, int64_t k,
                                    const std::string& dtype, int iters, const std::string& expert_dtype) {
        TimingBuffers b(ops.backend());
        std::vector<int32_t> offsets{0};
        for (int32_t rows : rows_per_expert) offsets.push_back(offsets.back() + rows);
        const int64_t experts = static_cast<int64_t>(rows_per_expert.size());
        const DType dt = parse_dtype(dtype), et = parse_weight_dtype(expert_dtype, dt);
        Tensor x = b.any(dt, {offsets.back(), k}), w = b.any(et, {experts, n, k});
        if (et == DType::kFloat8E4M3) w.row_scales = b.any(DType::kFloat32, {experts * n}).ptr<const float>();
        if (et == DType::kInt4) {  // scales of 1 and zeros of 8 (garbage could be NaN, and NaN may be slower)
          const int64_t groups = experts * n * int4_groups(k, kInt4QuantizeGroupSize);
          w.int4.scales = b.copied(DType::kFloat16, std::vector<uint16_t>(groups, float_to_fp16(1.0f)).data(), groups)
                              .ptr<const uint16_t>();
          w.int4.zeros = b.copied(DType::kInt4, std::vector<uint8_t>(groups, 8).data(), 2 * groups).ptr<const uint8_t>();
          w.int4.group_size = kInt4QuantizeGroupSize;
        }
        Tensor out = b.any(dt, {offsets.back(), n}), off = b.ints(offsets);
        return b.seconds([&] { ops.backend().expert_matmul(x, w, off, out); }, iters);
      }, py::arg("rows_per_expert"), py::arg("n"), py::arg("k"), py::arg("dtype"), py::arg("iters"),
         py::arg("expert_dtype") = "")
      .def("time_attention", [](Ops& ops, int64_t tokens, int64_t context, int heads, int kv_heads, int head_dim,
                                int page_size, const std::string& dtype, int iters) {
        MX_CHECK(tokens >= 1 && context >= tokens, ShapeError, "time_attention: need 1 <= tokens <= context");
        TimingBuffers b(ops.backend());
        const DType d = parse_dtype(dtype);
        const int64_t pages = (context + page_size - 1) / page_size;
        std::vector<int32_t> positions(tokens), table(pages);
        for (int64_t t = 0; t < tokens; ++t) positions[t] = static_cast<int32_t>(context - tokens + t);
        for (int64_t p = 0; p < pages; ++p) table[p] = static_cast<int32_t>(p);
        Tensor qkv = b.any(d, {tokens, int64_t(heads + 2 * kv_heads) * head_dim});
        Tensor k = b.any(d, {pages, kv_heads, page_size, head_dim}), v = b.any(d, {pages, kv_heads, page_size, head_dim});
        Tensor out = b.any(d, {tokens, int64_t(heads) * head_dim}), pos = b.ints(positions), pt = b.ints(table);
        const AttentionShape shape{heads, kv_heads, head_dim};
        const KvLayer kv = kv_layer(k, v);
        return b.seconds([&] { ops.backend().attention(qkv, shape, pos, kv, pt, out); }, iters);
      })
      .def("time_sample", [](Ops& ops, const FloatArray& logits, const SamplingParams& params, int iters) {
        TimingBuffers b(ops.backend());
        const int64_t V = logits.size(), n = std::min<int64_t>(params.logprobs, V);
        Tensor l = b.floats(logits), state = b.ints(std::vector<int32_t>(2 * V + 1, 0));
        Tensor token = b.any(DType::kInt32, {1}), logprob = b.any(DType::kFloat32, {1});
        Tensor top_ids = b.any(DType::kInt32, {n}), top_logprobs = b.any(DType::kFloat32, {n});
        return b.seconds([&] { ops.backend().sample(l, params, 1, state, token, logprob, top_ids, top_logprobs); },
                         iters);
      }, "Mean seconds of one draw from the given logits [V] (the state starts empty).")
      .def("moe_unpermute", [](Ops& ops, const FloatArray& y, const IntArray& expanded_to_permuted,
                               const FloatArray& weights, const std::string& dtype) {
        check_range(expanded_to_permuted, 0, y.shape(0), "permuted row");
        return ops.run([&](Buffers& b) {
          Tensor yt = b.input(y, parse_dtype(dtype)), e2p = b.input(expanded_to_permuted);
          Tensor w = b.input(weights, DType::kFloat32);
          Tensor out = b.output(parse_dtype(dtype), {weights.shape(0), y.shape(1)});
          ops.backend().moe_unpermute(yt, e2p, w, out);
          return b.to_float(out);
        });
      })
      .def("moe_unpermute_add_rmsnorm", [](Ops& ops, const FloatArray& y, const IntArray& expanded_to_permuted,
                                           const FloatArray& weights, const FloatArray& residual,
                                           const FloatArray& norm_weight, float eps, const std::string& dtype) {
        check_range(expanded_to_permuted, 0, y.shape(0), "permuted row");
        return ops.run([&](Buffers& b) {
          const DType d = parse_dtype(dtype);
          Tensor yt = b.input(y, d), e2p = b.input(expanded_to_permuted), w = b.input(weights, DType::kFloat32);
          Tensor r = b.input(residual, d), nw = b.input(norm_weight, d);
          Tensor delta = b.output(d, shape_of(residual)), out = b.output(d, shape_of(residual));
          ops.backend().moe_unpermute_add_rmsnorm(yt, e2p, w, delta, r, nw, eps, out);
          return py::make_tuple(b.to_float(r), b.to_float(out));
        });
      });
}

}  // namespace mixtral
