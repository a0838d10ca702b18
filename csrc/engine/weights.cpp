// The model's weights: the slots (layouts in engine/engine.h) laid out in one arena, filled from
// host blocks (converted, or quantized to FP8 with row scales, core/fp8.h) or at random, and the
// views of one layer's slot that the forward pass reads.
#include <algorithm>
#include <cmath>

#include "engine/arena.h"
#include "engine/engine.h"

namespace mixtral {

namespace {

const char* const kSlotNames[] = {"embed",    "lm_head", "final_norm", "attn_norm", "wqkv",
                                  "wo",       "ffn_norm", "router",    "w13",       "w2"};

}  // namespace

size_t Engine::plan_weights(const ModelConfig& c, const EngineOptions& options, SlotLayout* slots) {
  const int64_t H = c.hidden_size, E = c.num_experts, L = c.num_layers, F = c.intermediate_size;
  const int64_t shapes[][3] = {
      {c.vocab_size, H, 1},          {c.vocab_size, H, 1}, {1, H, 1},     {1, H, L},
      {c.qkv_width(), H, L},         {H, c.num_heads * c.head_dim, L},    {1, H, L},
      {E, H, L},                     {2 * F, H, L * E},   {H, F, L * E}};
  size_t total = 0;
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const bool expert = s == int(Slot::kW13) || s == int(Slot::kW2);
    const DType dtype = expert ? options.expert_dtype : options.weight_dtype;
    const size_t rows = size_t(shapes[s][0]) * shapes[s][2];
    slots[s] = SlotLayout{shapes[s][0], shapes[s][1], shapes[s][2], dtype, total, 0};
    total += align_up(rows * shapes[s][1] * dtype_size(dtype));
    if (dtype == DType::kFloat8E4M3) {
      slots[s].scale_offset = total;
      total += align_up(rows * sizeof(float));
    }
  }
  return total;
}

void Engine::load_weight(const std::string& slot_name, int64_t layer, int64_t expert,
                         int64_t row_offset, const void* src, DType src_dtype, int64_t rows,
                         int64_t cols, const float* src_row_scales) {
  const auto* found = std::find(std::begin(kSlotNames), std::end(kSlotNames), slot_name);
  MX_CHECK(found != std::end(kSlotNames), Error, "load_weight: unknown slot '" << slot_name << "'");
  const int s = static_cast<int>(found - std::begin(kSlotNames));
  const SlotLayout& slot = slots_[s];
  const bool per_expert = s == int(Slot::kW13) || s == int(Slot::kW2);
  const int64_t layers = slot.count == 1 ? 1 : config_.num_layers;
  const int64_t experts = per_expert ? config_.num_experts : 1;
  MX_CHECK(layer >= 0 && layer < layers && expert >= 0 && expert < experts, ShapeError,
           slot_name << ": layer " << layer << " / expert " << expert << " outside " << layers
                     << " layers / " << experts << " experts");
  MX_CHECK(cols == slot.cols && rows >= 1 && row_offset >= 0 && row_offset + rows <= slot.rows,
           ShapeError,
           slot_name << ": block [" << rows << ", " << cols << "] at row " << row_offset
                     << " does not fit the slot's [" << slot.rows << ", " << slot.cols << "]");
  const bool src_fp8 = src_dtype == DType::kFloat8E4M3;
  MX_CHECK(is_float(src_dtype) || (src_fp8 && src_row_scales), ShapeError,
           slot_name << ": unsupported source dtype " << dtype_name(src_dtype)
                     << (src_fp8 ? " without row scales" : ""));
  const int64_t instance = layer * experts + expert;
  const size_t first_row = size_t(instance) * slot.rows + row_offset;
  char* arena = static_cast<char*>(weight_arena_);
  std::vector<char> staging(size_t(rows) * cols * dtype_size(slot.dtype));
  std::vector<float> values;  // the block widened to float32, when it must be converted from FP8 or to it
  if (src_fp8 != (slot.dtype == DType::kFloat8E4M3)) {
    values.resize(size_t(rows) * cols);
    if (src_fp8) dequantize_rows_fp8(static_cast<const uint8_t*>(src), src_row_scales, rows, cols, values.data());
    else convert_host(src, src_dtype, values.data(), DType::kFloat32, rows * cols);
  }
  if (slot.dtype == DType::kFloat8E4M3) {
    std::vector<float> scales(rows);
    if (src_fp8) {
      std::memcpy(staging.data(), src, staging.size());
      std::copy(src_row_scales, src_row_scales + rows, scales.begin());
    } else {
      quantize_rows_fp8(values.data(), rows, cols, reinterpret_cast<uint8_t*>(staging.data()), scales.data());
    }
    backend_->copy_from_host(arena + slot.scale_offset + first_row * sizeof(float), scales.data(),
                             scales.size() * sizeof(float));
  } else if (src_fp8) {
    convert_host(values.data(), DType::kFloat32, staging.data(), slot.dtype, rows * cols);
  } else {
    convert_host(src, src_dtype, staging.data(), slot.dtype, rows * cols);
  }
  backend_->copy_from_host(arena + slot.offset + first_row * slot.cols * dtype_size(slot.dtype), staging.data(),
                           staging.size());
  rows_loaded_[s][instance] += rows;
}

std::vector<std::string> Engine::missing_weights() const {
  std::vector<std::string> missing;
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    for (size_t i = 0; i < rows_loaded_[s].size(); ++i) {
      if (rows_loaded_[s][i] != slots_[s].rows)
        missing.push_back(std::string(kSlotNames[s]) + "[" + std::to_string(i) + "]: " +
                          std::to_string(rows_loaded_[s][i]) + " of " +
                          std::to_string(slots_[s].rows) + " rows loaded");
    }
  }
  return missing;
}

void Engine::init_random(uint64_t seed) {
  const float sqrt3 = std::sqrt(3.0f);
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const SlotLayout& slot = slots_[s];
    Tensor all(static_cast<char*>(weight_arena_) + slot.offset, slot.dtype, backend_->device(),
               {slot.count * slot.rows * slot.cols});
    const Slot kind = static_cast<Slot>(s);
    float low = 0.5f, high = 1.5f;  // norms
    if (kind == Slot::kEmbed || kind == Slot::kRouter) {
      low = -sqrt3, high = sqrt3;
    } else if (kind != Slot::kFinalNorm && kind != Slot::kAttnNorm && kind != Slot::kFfnNorm) {
      high = sqrt3 / std::sqrt(static_cast<float>(slot.cols)), low = -high;
    }
    if (slot.dtype == DType::kFloat8E4M3) {  // values of std 1 times row scales in [0.5, 1.5] x the std
      Tensor scales(static_cast<char*>(weight_arena_) + slot.scale_offset, DType::kFloat32, backend_->device(),
                    {slot.count * slot.rows});
      backend_->fill_uniform(scales, ~(seed * 16 + s), 0.5f * high / sqrt3, 1.5f * high / sqrt3);
      high = sqrt3, low = -sqrt3;
    }
    backend_->fill_uniform(all, seed * 16 + s, low, high);
    std::fill(rows_loaded_[s].begin(), rows_loaded_[s].end(), slot.rows);
  }
  backend_->synchronize();
}

Tensor Engine::weight(Slot slot, int64_t layer) const {
  const SlotLayout& s = slots_[static_cast<int>(slot)];
  const bool per_expert = slot == Slot::kW13 || slot == Slot::kW2;
  const int64_t instance = per_expert ? layer * config_.num_experts : (s.count == 1 ? 0 : layer);
  char* arena = static_cast<char*>(weight_arena_);
  void* data = arena + s.offset + size_t(instance) * s.rows * s.cols * dtype_size(s.dtype);
  Tensor t = per_expert ? Tensor(data, s.dtype, backend_->device(), {config_.num_experts, s.rows, s.cols})
                        : Tensor(data, s.dtype, backend_->device(), {s.rows, s.cols});
  if (s.dtype == DType::kFloat8E4M3)
    t.row_scales = reinterpret_cast<const float*>(arena + s.scale_offset) + size_t(instance) * s.rows;
  return t;
}

Tensor Engine::norm_weight(Slot slot, int64_t layer) const {
  Tensor t = weight(slot, layer);
  return Tensor(t.data, t.dtype, t.device, {t.shape[1]});
}

}  // namespace mixtral
