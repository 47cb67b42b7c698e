// JSON bodies through the schema in api/api.proto: parse_json() checks a request body against a
// message's descriptor (well-formed UTF-8 JSON, an object at the top, nesting depth, and the JSON
// type of every known field, recursively) and then fills the message with protobuf's JSON mapping,
// ignoring unknown fields (OpenAI clients send extras). Any problem becomes an ApiException (400)
// whose param names the field ("policies[1].text"). print_json() writes a message with the proto
// field names and every scalar field present.
#pragma once

#include <google/protobuf/message.h>
#include <google/protobuf/struct.pb.h>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "api/errors.h"

namespace arbiter::api {

// Deepest object/array nesting a request body may have.
inline constexpr int kMaxJsonDepth = 64;

// Throws ApiException (400) when `body` is not a JSON object whose fields fit `out`'s schema.
void parse_json(std::string_view body, google::protobuf::Message& out);

// The message as JSON (proto field names; scalar fields always printed; unset optional/message
// fields left out).
std::string print_json(const google::protobuf::Message& message);

// The error body {"error": {...}} of `error`.
std::string error_json(const ApiError& error);

// Conversions between nlohmann::json and the google.protobuf.Value family.
google::protobuf::Value to_value(const nlohmann::json& json);
google::protobuf::Struct to_struct(const nlohmann::json& object);  // `object` must be an object
nlohmann::json from_value(const google::protobuf::Value& value);

// `text` with invalid UTF-8 replaced (error messages may quote client bytes).
std::string printable(std::string_view text);

}  // namespace arbiter::api
