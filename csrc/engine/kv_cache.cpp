// Page allocator and per-sequence page tables (see engine/kv_cache.h).
#include "engine/kv_cache.h"

#include "core/error.h"

namespace mixtral {

KvCacheManager::KvCacheManager(int num_pages, int page_size)
    : num_pages_(num_pages), page_size_(page_size) {
  MX_CHECK(num_pages > 0 && page_size > 0, Error,
           "kv cache: need at least one page of at least one token, got " << num_pages
                                                                          << " pages of " << page_size);
  free_.reserve(num_pages);
  for (int p = num_pages - 1; p >= 0; --p) free_.push_back(p);  // page 0 is taken first
}

KvCacheManager::Sequence& KvCacheManager::find(int sequence) {
  auto it = sequences_.find(sequence);
  MX_CHECK(it != sequences_.end(), Error, "kv cache: sequence " << sequence << " is closed");
  return it->second;
}

const KvCacheManager::Sequence& KvCacheManager::find(int sequence) const {
  return const_cast<KvCacheManager*>(this)->find(sequence);
}

int KvCacheManager::create() {
  sequences_.emplace(next_id_, Sequence{});
  return next_id_++;
}

void KvCacheManager::release(int sequence) {
  resize(sequence, 0);
  sequences_.erase(sequence);
}

void KvCacheManager::resize(int sequence, int64_t length) {
  Sequence& seq = find(sequence);
  MX_CHECK(length >= 0, Error, "kv cache: negative length " << length);
  const int64_t pages_needed = (length + page_size_ - 1) / page_size_;
  const int64_t pages_held = static_cast<int64_t>(seq.pages.size());
  MX_CHECK(pages_needed - pages_held <= static_cast<int64_t>(free_.size()), KvCacheFullError,
           "kv cache full: " << length << " tokens need " << pages_needed - pages_held
                             << " more pages of " << page_size_ << " tokens, " << free_.size()
                             << " of " << num_pages_ << " are free");
  while (static_cast<int64_t>(seq.pages.size()) < pages_needed) {
    seq.pages.push_back(free_.back());
    free_.pop_back();
  }
  while (static_cast<int64_t>(seq.pages.size()) > pages_needed) {
    free_.push_back(seq.pages.back());
    seq.pages.pop_back();
  }
  seq.length = length;
}

int64_t KvCacheManager::length(int sequence) const { return find(sequence).length; }

const std::vector<int32_t>& KvCacheManager::pages(int sequence) const { return find(sequence).pages; }

}  // namespace mixtral
