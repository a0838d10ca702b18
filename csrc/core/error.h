// Error types of the C++ core. Each maps to one Python exception class of
// mixtral_ext.errors (the translation lives in csrc/bindings/module.cpp).
// MX_CHECK(cond, ErrorType, message-stream) throws with the message; messages
// name the tensor, parameter or limit involved.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

#define MX_EXPORT __attribute__((visibility("default")))

namespace mixtral {

// Base of every error the core raises on purpose.
class MX_EXPORT Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A tensor, dtype or shape that does not fit what an operation or slot needs.
class MX_EXPORT ShapeError : public Error {
 public:
  using Error::Error;
};
// A token id outside [0, vocab_size).
class MX_EXPORT TokenError : public Error {
 public:
  using Error::Error;
};
// A sequence that would grow past the engine's max_context.
class MX_EXPORT ContextOverflowError : public Error {
 public:
  using Error::Error;
};
// The KV cache has no free pages left for an append.
class MX_EXPORT KvCacheFullError : public Error {
 public:
  using Error::Error;
};
// A failure reported by the CUDA runtime or cuBLAS.
class MX_EXPORT DeviceError : public Error {
 public:
  using Error::Error;
};
// Device memory could not be allocated.
class MX_EXPORT DeviceOutOfMemoryError : public DeviceError {
 public:
  using DeviceError::DeviceError;
};
// A collective between the ranks of a sharded engine failed: a rank died, or stopped answering.
class MX_EXPORT CollectiveError : public Error {
 public:
  using Error::Error;
};

}  // namespace mixtral

#define MX_CHECK(cond, ErrorType, msg)            \
  do {                                            \
    if (!(cond)) {                                \
      std::ostringstream mx_check_stream_;        \
      mx_check_stream_ << msg;                    \
      throw ErrorType(mx_check_stream_.str());    \
    }                                             \
  } while (0)
