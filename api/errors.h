// ApiError: what the HTTP API answers when a request cannot be served: the status code and the
// fields of the OpenAI-style error body {"error": {"message", "type", "param", "code"}}. Handlers
// throw ApiException; the server turns it into the reply (api/server.h).
#pragma once

#include <exception>
#include <stdexcept>
#include <string>

namespace arbiter::api {

struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;     // the offending request field; empty: null
  std::string code;      // machine-readable code; empty: null
  int retry_after = 0;   // seconds (Retry-After header) for 429 / 503; 0: none
};

// Thrown by request handling; carries the error to answer with.
class ApiException : public std::exception {
 public:
  explicit ApiException(ApiError error) : error_(std::move(error)) {}
  const ApiError& error() const { return error_; }
  const char* what() const noexcept override { return error_.message.c_str(); }

 private:
  ApiError error_;
};

// The database behind the server (PostgreSQL) cannot be reached now: the request is answered 503
// with Retry-After, and nothing it would have stored is acknowledged.
class StorageUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// 400 invalid_request_error.
inline ApiException bad_request(std::string message, std::string param = "", std::string code = "") {
  return ApiException({400, std::move(message), "invalid_request_error", std::move(param), std::move(code), 0});
}

}  // namespace arbiter::api
