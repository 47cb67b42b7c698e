#include "api/metrics.h"

#include <charconv>
#include <cmath>
#include <stdexcept>

namespace arbiter::api {
namespace {

bool valid_name(const std::string& name, bool allow_colon) {
  if (name.empty()) return false;
  for (size_t i = 0; i < name.size(); ++i) {
    const char c = name[i];
    const bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (allow_colon && c == ':');
    if (!letter && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

std::string escape_label_value(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

std::string escape_help(const std::string& help) {
  std::string out;
  for (char c : help) {
    if (c == '\\') out += "\\\\";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

// {a="x",b="y"} with an optional extra label (le for buckets); "" when there are none.
std::string label_text(const MetricLabels& labels, const std::string& extra_name = "", const std::string& extra_value = "") {
  if (labels.empty() && extra_name.empty()) return "";
  std::string out = "{";
  bool first = true;
  for (const auto& [k, v] : labels) {
    out += (first ? "" : ",") + k + "=\"" + escape_label_value(v) + "\"";
    first = false;
  }
  if (!extra_name.empty()) out += (first ? "" : ",") + extra_name + "=\"" + extra_value + "\"";
  return out + "}";
}

void atomic_add(std::atomic<double>& target, double amount) {
  double old = target.load();
  while (!target.compare_exchange_weak(old, old + amount)) {
  }
}

}  // namespace

std::string format_metric_value(double value) {
  if (std::isnan(value)) return "NaN";
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) return std::to_string(static_cast<long long>(value));
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), value);
  return std::string(buf, r.ptr);
}

void Counter::inc(double amount) {
  if (amount < 0) throw std::invalid_argument("a counter cannot decrease");
  atomic_add(value_, amount);
}

void Gauge::add(double amount) { atomic_add(value_, amount); }

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {
  for (size_t i = 1; i < bounds_.size(); ++i)
    if (!(bounds_[i - 1] < bounds_[i])) throw std::invalid_argument("histogram bounds must ascend");
}

void Histogram::observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  std::lock_guard<std::mutex> lock(mutex_);
  ++counts_[i];
  sum_ += value;
}

void Histogram::set(const std::vector<uint64_t>& bucket_counts, double sum) {
  if (bucket_counts.size() != bounds_.size() + 1) throw std::invalid_argument("histogram: wrong number of bucket counts");
  std::lock_guard<std::mutex> lock(mutex_);
  counts_ = bucket_counts;
  sum_ = sum;
}

Histogram::Snapshot Histogram::snapshot() const {
  std::lock_guard<std::mutex> lock(mutex_);
  Snapshot s;
  uint64_t running = 0;
  for (uint64_t c : counts_) s.cumulative.push_back(running += c);
  s.sum = sum_;
  s.count = running;
  return s;
}

MetricsRegistry::Family& MetricsRegistry::family(const std::string& name, const std::string& help, Kind kind,
                                                 const std::vector<double>& bounds, const MetricLabels& labels) {
  if (!valid_name(name, true)) throw std::invalid_argument("bad metric name '" + name + "'");
  for (const auto& [k, v] : labels)
    if (!valid_name(k, false) || k.rfind("__", 0) == 0 || (kind == Kind::kHistogram && k == "le"))
      throw std::invalid_argument("bad label name '" + k + "' on metric " + name);
  for (auto& f : families_) {
    if (f->name != name) continue;
    if (f->kind != kind || f->bounds != bounds) throw std::invalid_argument("metric " + name + " exists with another type");
    return *f;
  }
  families_.push_back(std::make_unique<Family>(Family{name, help, kind, bounds, {}, {}, {}}));
  return *families_.back();
}

Counter& MetricsRegistry::counter(const std::string& name, const std::string& help, const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& slot = family(name, help, Kind::kCounter, {}, labels).counters[labels];
  if (!slot) slot = std::make_unique<Counter>();
  return *slot;
}

Gauge& MetricsRegistry::gauge(const std::string& name, const std::string& help, const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& slot = family(name, help, Kind::kGauge, {}, labels).gauges[labels];
  if (!slot) slot = std::make_unique<Gauge>();
  return *slot;
}

Histogram& MetricsRegistry::histogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                                      const MetricLabels& labels) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto& slot = family(name, help, Kind::kHistogram, bounds, labels).histograms[labels];
  if (!slot) slot = std::make_unique<Histogram>(bounds);
  return *slot;
}

std::string MetricsRegistry::render() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out;
  for (const auto& f : families_) {
    static const char* kTypes[] = {"counter", "gauge", "histogram"};
    out += "# HELP " + f->name + " " + escape_help(f->help) + "\n";
    out += "# TYPE " + f->name + " " + kTypes[static_cast<int>(f->kind)] + "\n";
    for (const auto& [labels, c] : f->counters) out += f->name + label_text(labels) + " " + format_metric_value(c->value()) + "\n";
    for (const auto& [labels, g] : f->gauges) out += f->name + label_text(labels) + " " + format_metric_value(g->value()) + "\n";
    for (const auto& [labels, h] : f->histograms) {
      const Histogram::Snapshot s = h->snapshot();
      for (size_t i = 0; i <= f->bounds.size(); ++i) {
        const std::string le = i < f->bounds.size() ? format_metric_value(f->bounds[i]) : "+Inf";
        out += f->name + "_bucket" + label_text(labels, "le", le) + " " + std::to_string(s.cumulative[i]) + "\n";
      }
      out += f->name + "_sum" + label_text(labels) + " " + format_metric_value(s.sum) + "\n";
      out += f->name + "_count" + label_text(labels) + " " + std::to_string(s.count) + "\n";
    }
  }
  return out;
}

}  // namespace arbiter::api
