// KV cache manager: the page allocator and one page table per sequence.
// The K/V pools themselves ([num_pages, Hkv, page_size, D] per layer, see
// core/backend.h) belong to the engine; this class only decides which page
// holds which positions. Position p of a sequence lives in page
// pages[p / page_size], row p % page_size.
#pragma once

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace mixtral {

class KvCacheManager {
 public:
  KvCacheManager(int num_pages, int page_size);

  int create();                        // a new empty sequence; returns its id
  void release(int sequence);          // frees all its pages
  // Grows or shrinks the sequence to `length` positions, taking or freeing
  // pages. Throws KvCacheFullError (changing nothing) when pages run out.
  void resize(int sequence, int64_t length);

  int64_t length(int sequence) const;
  const std::vector<int32_t>& pages(int sequence) const;
  int num_pages() const { return num_pages_; }
  int page_size() const { return page_size_; }
  int free_pages() const { return static_cast<int>(free_.size()); }
  int num_sequences() const { return static_cast<int>(sequences_.size()); }

 private:
  struct Sequence {
    int64_t length = 0;
    std::vector<int32_t> pages;
  };
  Sequence& find(int sequence);
  const Sequence& find(int sequence) const;

  int num_pages_;
  int page_size_;
  int next_id_ = 0;
  std::vector<int32_t> free_;  // a stack: the last freed page is taken first
  std::unordered_map<int, Sequence> sequences_;
};

}  // namespace mixtral
