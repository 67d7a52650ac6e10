// Status: the error code and message every nsa entry point returns. The core never throws.
#pragma once

#include <string>
#include <utility>

namespace nsa {

enum class StatusCode {
  kOk = 0,
  kInvalidArgument,  // a precondition on the inputs failed; the message names the argument
  kUnsupported,      // valid request this build or backend does not implement
  kBackendError,     // the device runtime reported an error
};

struct Status {
  StatusCode code = StatusCode::kOk;
  std::string message;  // empty when ok

  bool ok() const { return code == StatusCode::kOk; }
  static Status Ok() { return {}; }
  static Status Invalid(std::string msg) { return {StatusCode::kInvalidArgument, std::move(msg)}; }
  static Status Unsupported(std::string msg) { return {StatusCode::kUnsupported, std::move(msg)}; }
};

const char* status_code_name(StatusCode code);

}  // namespace nsa
