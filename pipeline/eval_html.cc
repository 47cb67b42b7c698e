// report_html: the evaluation report as one self-contained HTML page (inline CSS and SVG, nothing
// fetched). Every number a reader or a test looks up carries data-metric (data-policy, data-stage,
// data-expected / data-predicted where they apply) and data-value, the exact value of report.json.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <string>

#include "pipeline/eval_report.h"

namespace arbiter {

namespace {

using json = nlohmann::json;

std::string escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

std::string text_of(const json& v) { return v.is_string() ? v.get<std::string>() : v.dump(); }

// How a number is shown: integers as they are, fractions with three decimals, null as a dash.
std::string shown(const json& v) {
  if (v.is_null()) return "&ndash;";
  if (v.is_number_integer() || v.is_number_unsigned()) return v.dump();
  if (v.is_number_float()) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.3f", v.get<double>());
    return buf;
  }
  return escape(text_of(v));
}

// An attribute list: name="value" pairs, escaped.
std::string attrs(std::initializer_list<std::pair<const char*, std::string>> list) {
  std::string out;
  for (const auto& [name, value] : list) out += std::string(" ") + name + "=\"" + escape(value) + "\"";
  return out;
}

std::string interval_text(const json& interval) {
  if (!interval.is_array() || interval.size() != 2) return "";
  return " <span class=\"ci\">[" + shown(interval[0]) + ", " + shown(interval[1]) + "]</span>";
}

const json& at_or_null(const json& j, const char* key) {
  static const json null_value;
  if (!j.is_object()) return null_value;
  const auto it = j.find(key);
  return it == j.end() ? null_value : *it;
}

void policy_table(std::ostringstream& out, const json& report) {
  out << "<h2>Policies</h2>\n<table id=\"policies\"><thead><tr><th>policy</th><th>tp</th><th>fp</th><th>tn</th>"
         "<th>fn</th><th>unknown</th><th>no verdict</th><th>precision</th><th>recall</th><th>F1</th></tr></thead><tbody>\n";
  for (const auto& [id, p] : report.at("policies").items()) {
    out << "<tr><th>" << escape(id) << "</th>";
    for (const char* m : {"tp", "fp", "tn", "fn", "unknown", "no_verdict"})
      out << "<td" << attrs({{"data-policy", id}, {"data-metric", m}, {"data-value", at_or_null(p, m).dump()}}) << ">"
          << shown(at_or_null(p, m)) << "</td>";
    for (const char* m : {"precision", "recall", "f1"}) {
      const json& iv = at_or_null(at_or_null(p, "intervals"), m);
      out << "<td" << attrs({{"data-policy", id}, {"data-metric", m}, {"data-value", at_or_null(p, m).dump()},
                             {"data-interval", iv.dump()}})
          << ">" << shown(at_or_null(p, m)) << interval_text(iv) << "</td>";
    }
    out << "</tr>\n";
  }
  out << "</tbody></table>\n";
}

void confusion_tables(std::ostringstream& out, const json& report) {
  out << "<h2>Confusion matrices</h2>\n<p class=\"note\">Rows: expected answer; columns: the verdict (null: no "
         "verdict). Items without a label for the policy are not counted.</p>\n";
  for (const auto& [id, p] : report.at("policies").items()) {
    const json& c = at_or_null(p, "confusion");
    if (c.is_null()) continue;
    int largest = 1;
    for (const auto& [e, row] : c.at("matrix").items())
      for (const auto& [k, v] : row.items()) largest = std::max(largest, v.get<int>());
    out << "<table class=\"confusion\"" << attrs({{"data-policy", id}}) << "><caption>" << escape(id)
        << "</caption><thead><tr><th>expected \\ verdict</th>";
    for (const auto& col : c.at("predicted")) out << "<th>" << escape(text_of(col)) << "</th>";
    out << "</tr></thead><tbody>\n";
    for (const auto& row : c.at("expected")) {
      const std::string e = text_of(row);
      out << "<tr><th>" << escape(e) << "</th>";
      for (const auto& col : c.at("predicted")) {
        const std::string pr = text_of(col);
        const int v = c.at("matrix").at(e).value(pr, 0);
        const double shade = static_cast<double>(v) / largest;
        char style[96];
        std::snprintf(style, sizeof style, "background: rgba(%s, %.2f)", e == pr ? "40, 150, 80" : "200, 60, 60",
                      0.08 + 0.6 * shade);
        out << "<td" << attrs({{"data-policy", id}, {"data-metric", "confusion"}, {"data-expected", e},
                               {"data-predicted", pr}, {"data-value", std::to_string(v)}, {"style", style}})
            << ">" << v << "</td>";
      }
      out << "</tr>\n";
    }
    out << "</tbody></table>\n";
  }
}

void cost_section(std::ostringstream& out, const json& report) {
  const json& cost = report.at("cost");
  const json& stages = cost.at("stages");
  out << "<h2>Cost per stage</h2>\n<table id=\"stages\"><thead><tr><th>stage</th><th>runs</th><th>decided</th>"
         "<th>decided share</th><th>prompt</th><th>cached</th><th>reasoning</th><th>completion</th>"
         "<th>computed / decision</th><th>latency p50 (s)</th><th>latency p99 (s)</th></tr></thead><tbody>\n";
  double largest = 0;
  for (const auto& [name, s] : stages.items()) {
    const json& per = s.at("per_decision").at("computed");
    if (per.is_number()) largest = std::max(largest, per.get<double>());
    auto cell = [&out, &name](const char* metric, const json& v) {
      out << "<td" << attrs({{"data-stage", name}, {"data-metric", metric}, {"data-value", v.dump()}}) << ">" << shown(v)
          << "</td>";
    };
    out << "<tr><th>" << escape(name) << "</th>";
    cell("runs", s.at("runs"));
    cell("decided", s.at("decided"));
    cell("decided_fraction", s.at("decided_fraction"));
    for (const char* t : {"prompt", "cached", "reasoning", "completion"}) cell(t, s.at("tokens").at(t));
    cell("computed_per_decision", per);
    cell("latency_p50", s.at("latency").at("p50"));
    cell("latency_p99", s.at("latency").at("p99"));
    out << "</tr>\n";
  }
  out << "</tbody></table>\n";
  // Bars: tokens computed per decision, by stage.
  const int width = 520, bar = 22, gap = 8, left = 80;
  const int height = static_cast<int>(stages.size()) * (bar + gap) + gap;
  out << "<svg id=\"stage-cost-chart\" width=\"" << width << "\" height=\"" << height << "\" role=\"img\" "
      << "aria-label=\"tokens computed per decision by stage\">\n";
  int y = gap;
  for (const auto& [name, s] : stages.items()) {
    const json& per = s.at("per_decision").at("computed");
    const double v = per.is_number() ? per.get<double>() : 0;
    const double w = largest > 0 ? (width - left - 90) * v / largest : 0;
    char line[512];
    std::snprintf(line, sizeof line,
                  "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%s</text><rect x=\"%d\" y=\"%d\" width=\"%.1f\" "
                  "height=\"%d\" class=\"bar\"/><text x=\"%.1f\" y=\"%d\">%.1f</text>\n",
                  left - 6, y + bar - 6, escape(name).c_str(), left, y, w, bar, left + w + 6, y + bar - 6, v);
    out << line;
    y += bar + gap;
  }
  out << "</svg>\n";
}

void agreement_section(std::ostringstream& out, const json& report) {
  const json& agreement = report.at("agreement");
  if (agreement.empty()) return;
  out << "<h2>Agreement with high effort</h2>\n<table id=\"agreement\"><thead><tr><th>stage</th><th>items</th>"
         "<th>agree</th><th>agreement</th></tr></thead><tbody>\n";
  for (const auto& [name, a] : agreement.items())
    out << "<tr><th>" << escape(name) << "</th><td>" << a.at("items") << "</td><td>" << a.at("agree") << "</td><td"
        << attrs({{"data-metric", "agreement"}, {"data-stage", name}, {"data-value", a.at("value").dump()}}) << ">"
        << shown(a.at("value")) << "</td></tr>\n";
  out << "</tbody></table>\n";
}

// The sweep as a scatter plot: tokens per item (x) against agreement with high (y); the target as a
// dashed line, the cheapest point reaching it and the configured thresholds marked.
void sweep_section(std::ostringstream& out, const json& report) {
  const json& sweep = report.at("sweep");
  if (sweep.is_null()) return;
  out << "<h2>Threshold sweep</h2>\n<p class=\"note\">Each point: the score and low thresholds of every policy's "
         "cascade set to one grid value; cost is the model tokens the cascade would have computed per item (prompt "
         "not cached + completion), agreement the share of items where its verdict equals high effort's.</p>\n";
  const json& points = sweep.at("points");
  double max_cost = 1, min_agree = 1;
  for (const auto& p : points) {
    max_cost = std::max(max_cost, p.at("cost_per_item").get<double>());
    if (p.at("agreement").is_number()) min_agree = std::min(min_agree, p.at("agreement").get<double>());
  }
  const double target = sweep.at("target_agreement").get<double>();
  min_agree = std::floor(std::min(min_agree, target) * 10) / 10;
  if (min_agree >= 1) min_agree = 0.9;
  const int W = 560, H = 320, L = 60, R = 20, T = 20, B = 40;
  auto px = [&](double cost) { return L + (W - L - R) * cost / max_cost; };
  auto py = [&](double agree) { return T + (H - T - B) * (1 - (agree - min_agree) / (1 - min_agree)); };
  char buf[512];
  out << "<svg id=\"sweep-chart\" width=\"" << W << "\" height=\"" << H << "\" role=\"img\" "
      << "aria-label=\"cost against agreement with high effort\">\n";
  std::snprintf(buf, sizeof buf,
                "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" class=\"axis\"/><line x1=\"%d\" y1=\"%d\" x2=\"%d\" "
                "y2=\"%d\" class=\"axis\"/>\n<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">tokens per item (max "
                "%.0f)</text><text x=\"14\" y=\"%d\" transform=\"rotate(-90 14 %d)\" text-anchor=\"middle\">agreement "
                "(%.1f&ndash;1)</text>\n",
                L, H - B, W - R, H - B, L, T, L, H - B, (L + W - R) / 2, H - 8, max_cost, (T + H - B) / 2, (T + H - B) / 2,
                min_agree);
  out << buf;
  std::snprintf(buf, sizeof buf, "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" class=\"target\"/>\n", L, py(target),
                W - R, py(target));
  out << buf;
  auto dot = [&](const json& p, const char* cls, double r) {
    if (!p.is_object() || !p.at("agreement").is_number()) return;
    std::snprintf(buf, sizeof buf, "<circle cx=\"%.1f\" cy=\"%.1f\" r=\"%.1f\" class=\"%s\"><title>score %s, low %s: "
                  "%.1f tokens/item, agreement %.3f</title></circle>\n",
                  px(p.at("cost_per_item").get<double>()), py(p.at("agreement").get<double>()), r, cls,
                  text_of(p.at("score")).c_str(), text_of(p.at("low")).c_str(), p.at("cost_per_item").get<double>(),
                  p.at("agreement").get<double>());
    out << buf;
  };
  for (const auto& p : points) dot(p, "point", 3);
  dot(sweep.at("configured"), "configured", 6);
  dot(sweep.at("best"), "best", 6);
  out << "</svg>\n<table id=\"sweep-summary\"><thead><tr><th></th><th>score threshold</th><th>low threshold</th>"
         "<th>tokens</th><th>tokens / item</th><th>agreement</th></tr></thead><tbody>\n";
  auto row = [&](const char* name, const json& p) {
    out << "<tr><th>" << name << "</th>";
    if (!p.is_object()) {
      out << "<td colspan=\"5\"" << attrs({{"data-metric", std::string("sweep_") + name}, {"data-value", "null"}})
          << ">no point reaches the target</td></tr>\n";
      return;
    }
    for (const char* k : {"score", "low", "cost", "cost_per_item", "agreement"})
      out << "<td" << attrs({{"data-metric", std::string("sweep_") + name + "_" + k}, {"data-value", p.at(k).dump()}})
          << ">" << shown(p.at(k)) << "</td>";
    out << "</tr>\n";
  };
  row("best", sweep.at("best"));
  row("configured", sweep.at("configured"));
  out << "</tbody></table>\n<p class=\"note\">Target agreement " << shown(sweep.at("target_agreement"))
      << "; high effort alone computed " << sweep.at("high_only_cost") << " tokens.</p>\n";
}

}  // namespace

std::string report_html(const nlohmann::json& report) {
  std::ostringstream out;
  out << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>arbiter eval report</title>\n"
         "<style>\n"
         "body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }\n"
         "table { border-collapse: collapse; margin: 0.5em 0 1.5em; }\n"
         "th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }\n"
         "th { background: #f4f4f4; } caption { font-weight: bold; text-align: left; }\n"
         ".ci, .note { color: #666; font-size: 12px; }\n"
         "svg text { font-size: 12px; fill: #333; } .bar { fill: #4a7bd0; }\n"
         ".axis { stroke: #333; } .target { stroke: #c33; stroke-dasharray: 4 3; }\n"
         ".point { fill: #4a7bd0; opacity: 0.6; } .best { fill: none; stroke: #1a9a3a; stroke-width: 2.5; }\n"
         ".configured { fill: none; stroke: #e08a00; stroke-width: 2.5; }\n"
         "</style></head><body>\n<h1>Policy evaluation</h1>\n";
  const json& meta = at_or_null(report, "meta");
  if (meta.is_object() && !meta.empty()) {
    out << "<table id=\"meta\"><tbody>\n";
    for (const auto& [k, v] : meta.items()) out << "<tr><th>" << escape(k) << "</th><td>" << escape(text_of(v)) << "</td></tr>\n";
    out << "</tbody></table>\n";
  }
  const json& acc = report.at("accuracy");
  out << "<p>Items: <b" << attrs({{"data-metric", "items"}, {"data-value", report.at("items").dump()}}) << ">"
      << report.at("items") << "</b>. Dataset lines refused: <b"
      << attrs({{"data-metric", "dataset_errors"}, {"data-value", report.at("dataset_errors").at("count").dump()}}) << ">"
      << report.at("dataset_errors").at("count") << "</b>. Accuracy over every known label (" << acc.at("items")
      << " items): <b" << attrs({{"data-metric", "accuracy"}, {"data-value", acc.at("value").dump()}}) << ">"
      << shown(acc.at("value")) << "</b>" << interval_text(acc.at("interval")) << ".</p>\n";
  policy_table(out, report);
  confusion_tables(out, report);
  cost_section(out, report);
  agreement_section(out, report);
  sweep_section(out, report);
  const json& errors = report.at("dataset_errors").at("lines");
  if (!errors.empty()) {
    out << "<h2>Dataset lines refused</h2>\n<ul id=\"dataset-errors\">\n";
    for (const auto& e : errors) out << "<li>line " << e.at("line") << ": " << escape(text_of(e.at("message"))) << "</li>\n";
    out << "</ul>\n";
  }
  out << "</body></html>\n";
  return out.str();
}

}  // namespace arbiter
