// A small Prometheus registry for GET /metrics: counters, gauges and histograms, each a family
// with a name, help text and any number of labelled series, rendered in the Prometheus text
// exposition format (version 0.0.4). Thread-safe: series are created under the registry's lock and
// updated with atomics; references to series stay valid for the registry's lifetime.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace arbiter::api {

// Label name/value pairs of one series, in the order they are printed.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

// A monotonically increasing count (requests, tokens).
class Counter {
 public:
  void inc(double amount = 1);
  // Mirrors a total counted elsewhere (e.g. by the scheduler); the caller keeps it monotonic.
  void set_total(double total) { value_.store(total); }
  double value() const { return value_.load(); }

 private:
  std::atomic<double> value_{0};
};

// A value that goes up and down (queue depth, blocks in use).
class Gauge {
 public:
  void set(double value) { value_.store(value); }
  void add(double amount);
  double value() const { return value_.load(); }

 private:
  std::atomic<double> value_{0};
};

// Observations counted into fixed buckets (upper bounds, ascending; +Inf is implicit).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  // Mirrors a histogram kept elsewhere: per-bucket (not cumulative) counts, bounds().size() + 1 of
  // them (the last is +Inf), and the sum of the observations.
  void set(const std::vector<uint64_t>& bucket_counts, double sum);
  const std::vector<double>& bounds() const { return bounds_; }
  // Cumulative counts per bound (+Inf last), the sum and the count.
  struct Snapshot {
    std::vector<uint64_t> cumulative;
    double sum = 0;
    uint64_t count = 0;
  };
  Snapshot snapshot() const;

 private:
  std::vector<double> bounds_;
  mutable std::mutex mutex_;
  std::vector<uint64_t> counts_;
  double sum_ = 0;
};

// The families of one process, rendered together for a scrape.
class MetricsRegistry {
 public:
  // The series of family `name` with `labels`, created on first use. Throws std::invalid_argument
  // for a bad metric/label name or when `name` exists with another type (or other bounds).
  Counter& counter(const std::string& name, const std::string& help, const MetricLabels& labels = {});
  Gauge& gauge(const std::string& name, const std::string& help, const MetricLabels& labels = {});
  Histogram& histogram(const std::string& name, const std::string& help, const std::vector<double>& bounds,
                       const MetricLabels& labels = {});

  // Every family in the text exposition format (families in the order they were created, series
  // sorted by labels).
  std::string render() const;

 private:
  enum class Kind { kCounter, kGauge, kHistogram };
  // One metric name: its help, type and labelled series.
  struct Family {
    std::string name, help;
    Kind kind;
    std::vector<double> bounds;
    std::map<MetricLabels, std::unique_ptr<Counter>> counters;
    std::map<MetricLabels, std::unique_ptr<Gauge>> gauges;
    std::map<MetricLabels, std::unique_ptr<Histogram>> histograms;
  };
  Family& family(const std::string& name, const std::string& help, Kind kind, const std::vector<double>& bounds,
                 const MetricLabels& labels);

  mutable std::mutex mutex_;
  std::vector<std::unique_ptr<Family>> families_;
};

// Formats a sample value the way Prometheus reads it (integers without a fraction, +Inf, NaN).
std::string format_metric_value(double value);

}  // namespace arbiter::api
