#include "tools/arbiter/sweep_svg.h"

#include <algorithm>
#include <cstdio>
#include <sstream>

namespace arbiter {
namespace {

std::string num(double v, int digits = 1) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

// A tick label: `digits` decimals, one more when that would round a fractional value.
std::string tick(double v, int digits) {
  const double scale = digits == 0 ? 1 : digits == 1 ? 10 : 100;
  return num(v, v * scale == static_cast<double>(static_cast<long long>(v * scale)) ? digits : digits + 1);
}

// Axis ticks: 0 and four steps to a round maximum at or above `top`.
double round_up(double top) {
  if (top <= 0) return 1;
  double step = 1;
  while (step * 10 <= top) step *= 10;
  while (step > top) step /= 10;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (step * m >= top) return step * m;
  return step * 10;
}

}  // namespace

std::string ranks_sweep_svg(const std::vector<SweepRow>& rows, const std::string& title) {
  const int W = 960, H = 400, top = 50, bottom = 340, plot_h = bottom - top;
  const int lx0 = 70, lx1 = 390, rx0 = 480, rx1 = 800;
  std::ostringstream o;
  o << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H << "\" font-family=\"sans-serif\" "
    << "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2 << "\" y=\"22\" text-anchor=\"middle\" font-size=\"14\">" << escape(title) << "</text>\n";
  if (rows.empty()) return o.str() + "</svg>\n";
  const size_t n = rows.size();
  auto x_at = [&](int x0, int x1, size_t i) { return x0 + (x1 - x0) * (static_cast<double>(i) + 0.5) / static_cast<double>(n); };
  auto axes = [&](int x0, int x1, double ymax, const std::string& label, int digits) {
    o << "<line x1=\"" << x0 << "\" y1=\"" << bottom << "\" x2=\"" << x1 << "\" y2=\"" << bottom << "\" stroke=\"black\"/>\n"
      << "<line x1=\"" << x0 << "\" y1=\"" << top << "\" x2=\"" << x0 << "\" y2=\"" << bottom << "\" stroke=\"black\"/>\n";
    for (int t = 0; t <= 4; ++t) {
      const double y = bottom - plot_h * t / 4.0;
      o << "<line x1=\"" << x0 - 4 << "\" y1=\"" << num(y) << "\" x2=\"" << x1 << "\" y2=\"" << num(y)
        << "\" stroke=\"#ddd\"/>\n<text x=\"" << x0 - 6 << "\" y=\"" << num(y + 4) << "\" text-anchor=\"end\">"
        << tick(ymax * t / 4, digits) << "</text>\n";
    }
    for (size_t i = 0; i < n; ++i)
      o << "<text x=\"" << num(x_at(x0, x1, i)) << "\" y=\"" << bottom + 16 << "\" text-anchor=\"middle\">" << rows[i].ranks
        << "</text>\n";
    o << "<text x=\"" << (x0 + x1) / 2 << "\" y=\"" << bottom + 34 << "\" text-anchor=\"middle\">ranks</text>\n"
      << "<text x=\"" << x0 - 50 << "\" y=\"" << (top + bottom) / 2 << "\" text-anchor=\"middle\" transform=\"rotate(-90 "
      << x0 - 50 << " " << (top + bottom) / 2 << ")\">" << label << "</text>\n";
  };
  // Left: decisions/s.
  double dmax = 0;
  for (const auto& r : rows) dmax = std::max(dmax, r.decisions_per_second);
  dmax = round_up(dmax);
  axes(lx0, lx1, dmax, "decisions/s", dmax < 10 ? 2 : 0);
  o << "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"";
  for (size_t i = 0; i < n; ++i)
    o << num(x_at(lx0, lx1, i)) << "," << num(bottom - plot_h * rows[i].decisions_per_second / dmax) << " ";
  o << "\"/>\n";
  for (size_t i = 0; i < n; ++i) {
    const double y = bottom - plot_h * rows[i].decisions_per_second / dmax;
    o << "<circle cx=\"" << num(x_at(lx0, lx1, i)) << "\" cy=\"" << num(y) << "\" r=\"4\" fill=\"#1f77b4\"/>\n"
      << "<text x=\"" << num(x_at(lx0, lx1, i)) << "\" y=\"" << num(y - 8) << "\" text-anchor=\"middle\">"
      << num(rows[i].decisions_per_second, 2) << "</text>\n";
  }
  // Right: stacked ms per step.
  struct Part {
    const char* name;
    const char* color;
    double SweepRow::*field;
  };
  const Part parts[] = {{"attention/dense", "#1f77b4", &SweepRow::dense_ms},
                        {"experts", "#2ca02c", &SweepRow::experts_ms},
                        {"dispatch", "#ff7f0e", &SweepRow::dispatch_ms},
                        {"combine", "#9467bd", &SweepRow::combine_ms},
                        {"waiting for peers", "#d62728", &SweepRow::wait_ms}};
  double tmax = 0;
  for (const auto& r : rows) {
    double sum = 0;
    for (const Part& p : parts) sum += r.*p.field;
    tmax = std::max(tmax, sum);
  }
  tmax = round_up(tmax);
  axes(rx0, rx1, tmax, "ms per step (per rank)", tmax < 10 ? 2 : 0);
  const double bar = std::min(60.0, (rx1 - rx0) / static_cast<double>(n) * 0.6);
  for (size_t i = 0; i < n; ++i) {
    double y = bottom;
    for (const Part& p : parts) {
      const double h = plot_h * std::max(0.0, rows[i].*p.field) / tmax;
      y -= h;
      o << "<rect x=\"" << num(x_at(rx0, rx1, i) - bar / 2) << "\" y=\"" << num(y) << "\" width=\"" << num(bar)
        << "\" height=\"" << num(h) << "\" fill=\"" << p.color << "\"><title>" << p.name << ": "
        << num(rows[i].*p.field, 2) << " ms</title></rect>\n";
    }
  }
  int ly = top;
  for (const Part& p : parts) {
    o << "<rect x=\"" << rx1 + 14 << "\" y=\"" << ly - 10 << "\" width=\"10\" height=\"10\" fill=\"" << p.color
      << "\"/><text x=\"" << rx1 + 29 << "\" y=\"" << ly << "\">" << p.name << "</text>\n";
    ly += 15;
  }
  o << "</svg>\n";
  return o.str();
}

}  // namespace arbiter
