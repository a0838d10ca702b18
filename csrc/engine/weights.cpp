// The model's weights: the slots (layouts in engine/engine.h) laid out in one arena, filled from
// host blocks (converted, quantized to FP8 with row scales, core/fp8.h, or to int4 in groups,
// core/int4.h, or int4 blocks as they are) or at random, and the views of one layer's slot that
// the forward pass reads.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "engine/arena.h"
#include "engine/engine.h"

namespace mixtral {

namespace {

const char* const kSlotNames[] = {"embed",    "lm_head", "final_norm", "attn_norm", "wqkv",
                                  "wo",       "ffn_norm", "router",    "w13",       "w2"};

}  // namespace

size_t Engine::plan_weights(const ModelConfig& c, const EngineOptions& options, SlotLayout* slots) {
  const int64_t H = c.hidden_size, E = c.num_experts, L = c.num_layers, F = c.intermediate_size;
  const int64_t held = options.experts_held(c);  // the router scores all E; the experts held have weights
  const int64_t shapes[][3] = {
      {c.vocab_size, H, 1},          {c.vocab_size, H, 1}, {1, H, 1},     {1, H, L},
      {c.qkv_width(), H, L},         {H, c.num_heads * c.head_dim, L},    {1, H, L},
      {E, H, L},                     {2 * F, H, L * held}, {H, F, L * held}};
  size_t total = 0;
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const bool expert = s == int(Slot::kW13) || s == int(Slot::kW2);
    const DType dtype = expert ? options.expert_dtype : options.weight_dtype;
    const size_t rows = size_t(shapes[s][0]) * shapes[s][2];
    const int64_t cols = shapes[s][1];
    SlotLayout& slot = slots[s];
    slot = SlotLayout{shapes[s][0], cols, shapes[s][2], dtype, total};
    total += align_up(bytes_of(dtype, int64_t(rows) * cols));
    if (dtype == DType::kFloat8E4M3) {
      slot.scale_offset = total;
      total += align_up(rows * sizeof(float));
    } else if (dtype == DType::kInt4) {
      MX_CHECK(cols % 2 == 0, Error, "int4 experts need even widths (two codes a byte), got " << cols);
      slot.group_size = options.int4_group_size > 0 ? options.int4_group_size : cols;
      slot.groups = int4_groups(cols, slot.group_size);
      slot.segments = s == int(Slot::kW13) ? 2 : 1;  // w1's rows and w3's have their own column orders
      slot.scale_offset = total;
      total += align_up(rows * slot.groups * sizeof(uint16_t));
      slot.zero_offset = total;
      total += align_up(rows * slot.groups);
      slot.order_offset = total;
      total += align_up(size_t(slot.count) * slot.segments * cols * sizeof(int32_t));
    }
  }
  return total;
}

int Engine::slot_index(const std::string& slot_name) const {
  const auto* found = std::find(std::begin(kSlotNames), std::end(kSlotNames), slot_name);
  MX_CHECK(found != std::end(kSlotNames), Error, "load_weight: unknown slot '" << slot_name << "'");
  return static_cast<int>(found - std::begin(kSlotNames));
}

size_t Engine::block_first_row(int s, int64_t layer, int64_t expert, int64_t row_offset, int64_t rows,
                               int64_t cols) const {
  const SlotLayout& slot = slots_[s];
  const bool per_expert = s == int(Slot::kW13) || s == int(Slot::kW2);
  const int64_t layers = slot.count == 1 ? 1 : config_.num_layers;
  const int64_t experts = per_expert ? config_.num_experts : 1;
  MX_CHECK(layer >= 0 && layer < layers && expert >= 0 && expert < experts, ShapeError,
           kSlotNames[s] << ": layer " << layer << " / expert " << expert << " outside " << layers
                         << " layers / " << experts << " experts");
  // Experts by the model's ids; this engine's slots hold its slice of them.
  const int64_t first_held = per_expert ? options_.first_expert : 0;
  const int64_t held = per_expert ? options_.experts_held(config_) : 1;
  MX_CHECK(expert >= first_held && expert < first_held + held, ShapeError,
           kSlotNames[s] << ": expert " << expert << " is not held here (this engine holds experts [" << first_held
                         << ", " << first_held + held << "))");
  MX_CHECK(cols == slot.cols && rows >= 1 && row_offset >= 0 && row_offset + rows <= slot.rows,
           ShapeError,
           kSlotNames[s] << ": block [" << rows << ", " << cols << "] at row " << row_offset
                         << " does not fit the slot's [" << slot.rows << ", " << slot.cols << "]");
  return size_t(layer * held + expert - first_held) * slot.rows + row_offset;
}

void Engine::load_weight(const std::string& slot_name, int64_t layer, int64_t expert,
                         int64_t row_offset, const void* src, DType src_dtype, int64_t rows,
                         int64_t cols, const float* src_row_scales) {
  const int s = slot_index(slot_name);
  const SlotLayout& slot = slots_[s];
  const size_t first_row = block_first_row(s, layer, expert, row_offset, rows, cols);
  const bool src_fp8 = src_dtype == DType::kFloat8E4M3;
  MX_CHECK(is_float(src_dtype) || (src_fp8 && src_row_scales), ShapeError,
           slot_name << ": unsupported source dtype " << dtype_name(src_dtype)
                     << (src_fp8 ? " without row scales" : ""));
  char* arena = static_cast<char*>(weight_arena_);
  // The block widened to float32, when it must be converted from FP8 or quantized.
  std::vector<float> values;
  if (src_fp8 ? slot.dtype != DType::kFloat8E4M3 : !is_float(slot.dtype)) {
    values.resize(size_t(rows) * cols);
    if (src_fp8) dequantize_rows_fp8(static_cast<const uint8_t*>(src), src_row_scales, rows, cols, values.data());
    else convert_host(src, src_dtype, values.data(), DType::kFloat32, rows * cols);
  }
  if (slot.dtype == DType::kInt4) {
    std::vector<uint8_t> packed(size_t(rows) * cols / 2), zeros(size_t(rows) * slot.groups);
    std::vector<uint16_t> scales(zeros.size());
    quantize_rows_int4(values.data(), rows, cols, slot.group_size, packed.data(), scales.data(), zeros.data());
    store_int4_block(s, first_row, rows, packed.data(), scales.data(), zeros.data(), nullptr);
    rows_loaded_[s][first_row / slot.rows] += rows;
    return;
  }
  std::vector<char> staging(size_t(rows) * cols * dtype_size(slot.dtype));
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
  rows_loaded_[s][first_row / slot.rows] += rows;
}

void Engine::load_weight_int4(const std::string& slot_name, int64_t layer, int64_t expert, int64_t row_offset,
                              const uint8_t* packed, int64_t rows, int64_t cols, const float* scales,
                              const float* zeros, const int32_t* column_groups) {
  const int s = slot_index(slot_name);
  const SlotLayout& slot = slots_[s];
  MX_CHECK(slot.dtype == DType::kInt4, ShapeError,
           slot_name << ": int4 blocks go into int4 expert slots (expert_dtype int4); this slot holds "
                     << dtype_name(slot.dtype));
  const size_t first_row = block_first_row(s, layer, expert, row_offset, rows, cols);
  const int64_t groups = slot.groups, group_size = slot.group_size;
  // Act order: the columns sorted by group (stable), which must leave group_size columns a group.
  std::vector<int32_t> order;
  if (column_groups) {
    bool consecutive = true;
    for (int64_t c = 0; c < cols; ++c) {
      MX_CHECK(column_groups[c] >= 0 && column_groups[c] < groups, ShapeError,
               slot_name << ": column " << c << " is in group " << column_groups[c] << ", outside [0, " << groups
                         << ")");
      consecutive = consecutive && column_groups[c] == c / group_size;
    }
    if (!consecutive) {
      MX_CHECK(options_.int4_act_order, ShapeError,
               slot_name << ": a block with act order (its columns' groups not in column order) needs an engine "
                            "made with int4_act_order, whose workspace holds the inputs in column order");
      const int64_t segment_rows = slot.rows / slot.segments;
      MX_CHECK(row_offset % segment_rows == 0 && rows == segment_rows, ShapeError,
               slot_name << ": a block with its own column order fills one whole projection of " << segment_rows
                         << " rows, not " << rows << " at row " << row_offset);
      order.resize(cols);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return column_groups[a] < column_groups[b]; });
      for (int64_t j = 0; j < cols; ++j)
        MX_CHECK(column_groups[order[j]] == j / group_size, ShapeError,
                 slot_name << ": act-order groups must hold " << group_size << " columns each");
    }
  }
  std::vector<uint8_t> ordered;  // the codes in the column order, with act order
  if (!order.empty()) {
    ordered.resize(size_t(rows) * cols / 2);
    permute_int4_columns(packed, rows, cols, order.data(), ordered.data());
  }
  std::vector<uint8_t> zero_bytes(size_t(rows) * groups);
  std::vector<uint16_t> scale_bits(zero_bytes.size());
  for (size_t i = 0; i < zero_bytes.size(); ++i) {
    MX_CHECK(zeros[i] >= 0.0f && zeros[i] <= 16.0f && zeros[i] == std::nearbyint(zeros[i]), ShapeError,
             slot_name << ": zero point " << zeros[i] << " is not an integer in [0, 16]");
    scale_bits[i] = float_to_fp16(scales[i]);
    MX_CHECK(std::isfinite(fp16_to_float(scale_bits[i])), ShapeError,
             slot_name << ": scale " << scales[i] << " is not finite in float16");
    zero_bytes[i] = static_cast<uint8_t>(zeros[i]);
  }
  store_int4_block(s, first_row, rows, order.empty() ? packed : ordered.data(), scale_bits.data(), zero_bytes.data(),
                   order.empty() ? nullptr : order.data());
  rows_loaded_[s][first_row / slot.rows] += rows;
}

void Engine::store_int4_block(int s, size_t first_row, int64_t rows, const uint8_t* packed, const uint16_t* scales,
                              const uint8_t* zeros, const int32_t* order) {
  SlotLayout& slot = slots_[s];
  char* arena = static_cast<char*>(weight_arena_);
  backend_->copy_from_host(arena + slot.offset + bytes_of(DType::kInt4, first_row * slot.cols), packed,
                           bytes_of(DType::kInt4, rows * slot.cols));
  backend_->copy_from_host(arena + slot.scale_offset + first_row * slot.groups * sizeof(uint16_t), scales,
                           rows * slot.groups * sizeof(uint16_t));
  backend_->copy_from_host(arena + slot.zero_offset + first_row * slot.groups, zeros, rows * slot.groups);
  if (!order) return;  // the segment keeps the identity order it was given at construction
  const int64_t instance = first_row / slot.rows, segment = (first_row % slot.rows) / (slot.rows / slot.segments);
  backend_->copy_from_host(arena + slot.order_offset + (instance * slot.segments + segment) * slot.cols * sizeof(int32_t),
                           order, slot.cols * sizeof(int32_t));
  slot.ordered = true;
}

void Engine::reset_int4_orders() {
  for (SlotLayout& slot : slots_) {
    if (slot.dtype != DType::kInt4) continue;
    std::vector<int32_t> identity(size_t(slot.count) * slot.segments * slot.cols);
    for (size_t i = 0; i < identity.size(); ++i) identity[i] = static_cast<int32_t>(i % slot.cols);
    backend_->copy_from_host(static_cast<char*>(weight_arena_) + slot.order_offset, identity.data(),
                             identity.size() * sizeof(int32_t));
    slot.ordered = false;
  }
}

int64_t Engine::int4_groups_of(const std::string& slot) const { return slots_[slot_index(slot)].groups; }

std::vector<std::string> Engine::missing_weights() const {
  std::vector<std::string> missing;
  const int64_t held = options_.experts_held(config_);
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const bool per_expert = s == int(Slot::kW13) || s == int(Slot::kW2);
    for (size_t i = 0; i < rows_loaded_[s].size(); ++i) {
      if (rows_loaded_[s][i] == slots_[s].rows) continue;
      // Instance i: layer i, or of an expert slot layer i / held and the model's expert first + i % held.
      const std::string instance =
          per_expert ? "layer " + std::to_string(i / held) + ", expert " + std::to_string(options_.first_expert + i % held)
                     : std::to_string(i);
      missing.push_back(std::string(kSlotNames[s]) + "[" + instance + "]: " + std::to_string(rows_loaded_[s][i]) +
                        " of " + std::to_string(slots_[s].rows) + " rows loaded");
    }
  }
  return missing;
}

void Engine::init_random(uint64_t seed) {
  const float sqrt3 = std::sqrt(3.0f);
  char* arena = static_cast<char*>(weight_arena_);
  reset_int4_orders();
  for (int s = 0; s < static_cast<int>(Slot::kCount); ++s) {
    const SlotLayout& slot = slots_[s];
    Tensor all(arena + slot.offset, slot.dtype, backend_->device(),
               {slot.count * slot.rows * slot.cols});
    const Slot kind = static_cast<Slot>(s);
    float low = 0.5f, high = 1.5f;  // norms
    if (kind == Slot::kEmbed || kind == Slot::kRouter) {
      low = -sqrt3, high = sqrt3;
    } else if (kind != Slot::kFinalNorm && kind != Slot::kAttnNorm && kind != Slot::kFfnNorm) {
      high = sqrt3 / std::sqrt(static_cast<float>(slot.cols)), low = -high;
    }
    if (slot.dtype == DType::kInt4) {  // codes 1..15, zero 8 (mean 0, std 4.32), scales in [0.5, 1.5] x std / 4.32
      const int64_t group_count = slot.count * slot.rows * slot.groups;
      Tensor scales(arena + slot.scale_offset, DType::kFloat16, backend_->device(), {group_count});
      backend_->fill_uniform(scales, ~(seed * 16 + s), 0.5f * high / sqrt3 / 4.32f, 1.5f * high / sqrt3 / 4.32f);
      const std::vector<uint8_t> eights(std::min<int64_t>(group_count, int64_t(1) << 24), 8);
      for (int64_t done = 0; done < group_count; done += int64_t(eights.size()))
        backend_->copy_from_host(arena + slot.zero_offset + done, eights.data(),
                                 std::min<int64_t>(eights.size(), group_count - done));
      high = 16.0f, low = 1.0f;
    } else if (slot.dtype == DType::kFloat8E4M3) {  // values of std 1 times row scales in [0.5, 1.5] x the std
      Tensor scales(arena + slot.scale_offset, DType::kFloat32, backend_->device(),
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
  const int64_t held = options_.experts_held(config_);
  const int64_t instance = per_expert ? layer * held : (s.count == 1 ? 0 : layer);
  char* arena = static_cast<char*>(weight_arena_);
  void* data = arena + s.offset + bytes_of(s.dtype, instance * s.rows * s.cols);
  Tensor t = per_expert ? Tensor(data, s.dtype, backend_->device(), {held, s.rows, s.cols})
                        : Tensor(data, s.dtype, backend_->device(), {s.rows, s.cols});
  if (s.dtype == DType::kFloat8E4M3)
    t.row_scales = reinterpret_cast<const float*>(arena + s.scale_offset) + size_t(instance) * s.rows;
  if (s.dtype == DType::kInt4) {
    const size_t first_group = size_t(instance) * s.rows * s.groups;
    t.int4 = Int4Groups{reinterpret_cast<const uint16_t*>(arena + s.scale_offset) + first_group,
                        reinterpret_cast<const uint8_t*>(arena + s.zero_offset) + first_group,
                        s.ordered ? reinterpret_cast<const int32_t*>(arena + s.order_offset) +
                                        size_t(instance) * s.segments * s.cols
                                  : nullptr,
                        int32_t(s.group_size), int32_t(s.segments)};
  }
  return t;
}

Tensor Engine::norm_weight(Slot slot, int64_t layer) const {
  Tensor t = weight(slot, layer);
  return Tensor(t.data, t.dtype, t.device, {t.shape[1]});
}

}  // namespace mixtral
