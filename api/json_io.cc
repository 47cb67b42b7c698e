#include "api/json_io.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>

#include <cmath>
#include <limits>
#include <stdexcept>

#include "api/api.pb.h"
#include "runtime/utf8.h"

namespace arbiter::api {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using nlohmann::json;

const char* describe(const json& v) {
  switch (v.type()) {
    case json::value_t::null: return "null";
    case json::value_t::boolean: return "a boolean";
    case json::value_t::string: return "a string";
    case json::value_t::number_integer:
    case json::value_t::number_unsigned: return "an integer";
    case json::value_t::number_float: return "a number";
    case json::value_t::object: return "an object";
    case json::value_t::array: return "an array";
    default: return "an unsupported value";
  }
}

[[noreturn]] void wrong_type(const std::string& path, const std::string& expected, const json& got) {
  throw bad_request("Invalid type for '" + path + "': expected " + expected + ", but got " + describe(got) + " instead.",
                    path, "invalid_type");
}

// Nesting depth of `body` outside strings, stopping as soon as it passes the limit.
bool nesting_too_deep(std::string_view body) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      if (++depth > kMaxJsonDepth) return true;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return false;
}

void check_integer(const json& v, const FieldDescriptor& field, const std::string& path) {
  double value = 0;
  if (v.is_number_integer() || v.is_number_unsigned()) {
    value = v.is_number_unsigned() ? static_cast<double>(v.get<uint64_t>()) : static_cast<double>(v.get<int64_t>());
  } else if (v.is_number_float()) {
    value = v.get<double>();
    if (!std::isfinite(value) || value != std::floor(value)) wrong_type(path, "an integer", v);
  } else {
    wrong_type(path, "an integer", v);
  }
  double lo = 0, hi = 0;
  switch (field.cpp_type()) {
    case FieldDescriptor::CPPTYPE_INT32:
      lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
      break;
    case FieldDescriptor::CPPTYPE_UINT32: hi = std::numeric_limits<uint32_t>::max(); break;
    case FieldDescriptor::CPPTYPE_INT64: lo = -9.2e18, hi = 9.2e18; break;
    default: hi = 1.8e19; break;
  }
  if (value < lo || value > hi)
    throw bad_request("Invalid value for '" + path + "': " + v.dump() + " is out of range.", path, "invalid_value");
}

void check_message(const json& v, const Descriptor& type, const std::string& path);

void check_single(const json& v, const FieldDescriptor& field, const std::string& path) {
  switch (field.cpp_type()) {
    case FieldDescriptor::CPPTYPE_STRING:
      if (!v.is_string()) wrong_type(path, "a string", v);
      break;
    case FieldDescriptor::CPPTYPE_BOOL:
      if (!v.is_boolean()) wrong_type(path, "a boolean", v);
      break;
    case FieldDescriptor::CPPTYPE_INT32:
    case FieldDescriptor::CPPTYPE_INT64:
    case FieldDescriptor::CPPTYPE_UINT32:
    case FieldDescriptor::CPPTYPE_UINT64: check_integer(v, field, path); break;
    case FieldDescriptor::CPPTYPE_FLOAT:
    case FieldDescriptor::CPPTYPE_DOUBLE:
      if (!v.is_number()) wrong_type(path, "a number", v);
      break;
    case FieldDescriptor::CPPTYPE_ENUM:
      if (!v.is_string() && !v.is_number_integer()) wrong_type(path, "a string", v);
      break;
    case FieldDescriptor::CPPTYPE_MESSAGE: check_message(v, *field.message_type(), path); break;
  }
}

void check_message(const json& v, const Descriptor& type, const std::string& path) {
  const std::string& name = type.full_name();
  if (name == "google.protobuf.Value") return;  // anything
  if (name == "google.protobuf.Struct") {
    if (!v.is_object()) wrong_type(path, "an object", v);
    return;
  }
  if (name == "google.protobuf.ListValue") {
    if (!v.is_array()) wrong_type(path, "an array", v);
    return;
  }
  if (!v.is_object()) {
    if (path.empty()) throw bad_request("The request body must be a JSON object, not " + std::string(describe(v)) + ".", "", "invalid_json");
    wrong_type(path, "an object", v);
  }
  for (const auto& [key, value] : v.items()) {
    const FieldDescriptor* field = type.FindFieldByName(key);
    if (!field) field = type.FindFieldByCamelcaseName(key);
    if (!field || value.is_null()) continue;  // unknown fields are ignored; null is the default
    const std::string field_path = path.empty() ? field->name() : path + "." + field->name();
    if (!field->is_repeated()) {
      check_single(value, *field, field_path);
      continue;
    }
    if (!value.is_array()) wrong_type(field_path, "an array", value);
    const bool value_elements = field->message_type() && field->message_type()->full_name() == "google.protobuf.Value";
    for (size_t i = 0; i < value.size(); ++i) {
      const std::string element_path = field_path + "[" + std::to_string(i) + "]";
      if (value[i].is_null() && !value_elements) wrong_type(element_path, "a value", value[i]);
      check_single(value[i], *field, element_path);
    }
  }
}

// "(policies[0].text): invalid value ..." -> "policies[0].text".
std::string param_of_protobuf_error(const std::string& message) {
  const size_t open = message.find('(');
  const size_t close = message.find("):", open == std::string::npos ? 0 : open);
  if (open == std::string::npos || close == std::string::npos) return "";
  return message.substr(open + 1, close - open - 1);
}

}  // namespace

std::string printable(std::string_view text) { return utf8::repair(text); }

void parse_json(std::string_view body, google::protobuf::Message& out) {
  if (nesting_too_deep(body))
    throw bad_request("The JSON body is nested more than " + std::to_string(kMaxJsonDepth) + " levels deep.", "", "invalid_json");
  json parsed;
  try {
    parsed = json::parse(body);
  } catch (const json::exception& e) {
    std::string why = e.what();
    if (const size_t bracket = why.find("] "); why.rfind("[json.exception", 0) == 0 && bracket != std::string::npos)
      why = why.substr(bracket + 2);
    throw bad_request("We could not parse the JSON body of your request (" + printable(why) + ").", "", "invalid_json");
  }
  check_message(parsed, *out.GetDescriptor(), "");
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = true;
  const auto status = google::protobuf::util::JsonStringToMessage(std::string(body), &out, options);
  if (!status.ok()) {
    const std::string message(status.message());
    throw bad_request("Invalid request body: " + printable(message), param_of_protobuf_error(message), "invalid_value");
  }
}

std::string print_json(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  const auto status = google::protobuf::util::MessageToJsonString(message, &out, options);
  if (!status.ok()) throw std::runtime_error("cannot print " + message.GetTypeName() + " as JSON: " + std::string(status.message()));
  return out;
}

google::protobuf::Value to_value(const json& j) {
  google::protobuf::Value v;
  switch (j.type()) {
    case json::value_t::null: v.set_null_value(google::protobuf::NULL_VALUE); break;
    case json::value_t::boolean: v.set_bool_value(j.get<bool>()); break;
    case json::value_t::string: v.set_string_value(printable(j.get_ref<const std::string&>())); break;
    case json::value_t::number_integer:
    case json::value_t::number_unsigned:
    case json::value_t::number_float: v.set_number_value(j.get<double>()); break;
    case json::value_t::object: *v.mutable_struct_value() = to_struct(j); break;
    case json::value_t::array:
      for (const json& e : j) *v.mutable_list_value()->add_values() = to_value(e);
      break;
    default: v.set_null_value(google::protobuf::NULL_VALUE); break;
  }
  return v;
}

google::protobuf::Struct to_struct(const json& object) {
  google::protobuf::Struct s;
  if (!object.is_object()) return s;
  for (const auto& [key, value] : object.items()) (*s.mutable_fields())[printable(key)] = to_value(value);
  return s;
}

json from_value(const google::protobuf::Value& v) {
  switch (v.kind_case()) {
    case google::protobuf::Value::kBoolValue: return v.bool_value();
    case google::protobuf::Value::kNumberValue: return v.number_value();
    case google::protobuf::Value::kStringValue: return v.string_value();
    case google::protobuf::Value::kStructValue: {
      json o = json::object();
      for (const auto& [key, value] : v.struct_value().fields()) o[key] = from_value(value);
      return o;
    }
    case google::protobuf::Value::kListValue: {
      json a = json::array();
      for (const auto& e : v.list_value().values()) a.push_back(from_value(e));
      return a;
    }
    default: return nullptr;
  }
}

std::string error_json(const ApiError& error) {
  wire::ErrorResponse body;
  wire::ErrorDetail* d = body.mutable_error();
  d->set_message(printable(error.message));
  d->set_type(error.type);
  if (error.param.empty()) d->mutable_param()->set_null_value(google::protobuf::NULL_VALUE);
  else d->mutable_param()->set_string_value(printable(error.param));
  if (error.code.empty()) d->mutable_code()->set_null_value(google::protobuf::NULL_VALUE);
  else d->mutable_code()->set_string_value(error.code);
  return print_json(body);
}

}  // namespace arbiter::api
