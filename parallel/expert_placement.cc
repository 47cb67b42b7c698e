#include "parallel/expert_placement.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>
#include <stdexcept>

namespace arbiter {
namespace {

std::string describe(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size() && i < 8; ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  if (ids.size() > 8) s += ", ...";
  return s;
}

}  // namespace

ExpertPlacement ExpertPlacement::contiguous(int num_experts, int num_ranks) {
  if (num_experts <= 0) throw std::invalid_argument("expert placement: the model has no experts");
  if (num_ranks <= 0) throw std::invalid_argument("expert placement: need at least one rank");
  if (num_ranks > num_experts)
    throw std::invalid_argument("expert placement: " + std::to_string(num_ranks) + " ranks but only " +
                                std::to_string(num_experts) +
                                " experts per layer; every rank must own at least one expert (use fewer ranks)");
  std::vector<std::vector<int>> lists(static_cast<size_t>(num_ranks));
  const int base = num_experts / num_ranks, extra = num_experts % num_ranks;
  int next = 0;
  for (int r = 0; r < num_ranks; ++r)
    for (int i = 0; i < base + (r < extra ? 1 : 0); ++i) lists[static_cast<size_t>(r)].push_back(next++);
  return from_lists(num_experts, lists, "contiguous placement");
}

ExpertPlacement ExpertPlacement::from_lists(int num_experts, const std::vector<std::vector<int>>& lists,
                                            const std::string& source) {
  if (num_experts <= 0) throw std::invalid_argument(source + ": the number of experts must be positive");
  if (lists.empty()) throw std::invalid_argument(source + ": no ranks");
  if (static_cast<int>(lists.size()) > num_experts)
    throw std::invalid_argument(source + ": " + std::to_string(lists.size()) + " ranks but only " +
                                std::to_string(num_experts) + " experts; every rank must own at least one expert");
  ExpertPlacement p;
  p.owner_.assign(static_cast<size_t>(num_experts), -1);
  p.local_.assign(static_cast<size_t>(num_experts), -1);
  for (size_t r = 0; r < lists.size(); ++r) {
    std::vector<int> ids = lists[r];
    std::sort(ids.begin(), ids.end());
    if (ids.empty()) throw std::invalid_argument(source + ": rank " + std::to_string(r) + " owns no experts");
    for (size_t i = 0; i < ids.size(); ++i) {
      const int e = ids[i];
      if (e < 0 || e >= num_experts)
        throw std::invalid_argument(source + ": rank " + std::to_string(r) + " lists expert " + std::to_string(e) +
                                    ", outside 0.." + std::to_string(num_experts - 1));
      int& owner = p.owner_[static_cast<size_t>(e)];
      if (owner >= 0)
        throw std::invalid_argument(source + ": expert " + std::to_string(e) + " is listed " +
                                    (owner == static_cast<int>(r) ? "twice for rank " + std::to_string(r)
                                                                  : "for rank " + std::to_string(owner) +
                                                                        " and again for rank " + std::to_string(r)));
      owner = static_cast<int>(r);
      p.local_[static_cast<size_t>(e)] = static_cast<int>(i);
    }
    if (ids.back() - ids.front() + 1 != static_cast<int>(ids.size()))
      throw std::invalid_argument(source + ": rank " + std::to_string(r) + " owns experts " + describe(ids) +
                                  ", which are not one contiguous run (each rank loads one contiguous slice)");
    p.experts_.push_back(std::move(ids));
  }
  std::vector<int> missing;
  for (int e = 0; e < num_experts; ++e)
    if (p.owner_[static_cast<size_t>(e)] < 0) missing.push_back(e);
  if (!missing.empty())
    throw std::invalid_argument(source + ": no rank owns expert" + (missing.size() > 1 ? "s " : " ") + describe(missing));
  return p;
}

ExpertPlacement ExpertPlacement::parse(const std::string& text, const std::string& source) {
  std::istringstream in(text);
  std::string line;
  int line_no = 0, num_experts = -1;
  std::vector<std::vector<int>> lists;
  std::vector<bool> seen;
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument(source + ":" + std::to_string(line_no) + ": " + why);
  };
  auto number = [&](const std::string& s) {
    if (s.empty() || !std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); }) || s.size() > 9)
      fail("'" + s + "' is not a non-negative integer");
    const int v = std::stoi(s);
    if (v > 1000000) fail(s + " is too large");
    return v;
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (const auto hash = line.find('#'); hash != std::string::npos) line.erase(hash);
    std::istringstream words(line);
    std::string key;
    if (!(words >> key)) continue;
    if (key == "experts") {
      std::string n, rest;
      if (!(words >> n) || (words >> rest)) fail("expected 'experts N'");
      if (num_experts >= 0) fail("'experts' given twice");
      num_experts = number(n);
    } else if (key == "rank") {
      std::string rest;
      std::getline(words, rest);
      const auto colon = rest.find(':');
      if (colon == std::string::npos) fail("expected 'rank R: experts'");
      std::string r = rest.substr(0, colon);
      r.erase(std::remove_if(r.begin(), r.end(), [](unsigned char c) { return std::isspace(c); }), r.end());
      rest.erase(0, colon + 1);
      const int rank = number(r);
      if (rank >= static_cast<int>(seen.size())) {
        seen.resize(static_cast<size_t>(rank) + 1, false);
        lists.resize(static_cast<size_t>(rank) + 1);
      }
      if (seen[static_cast<size_t>(rank)]) fail("rank " + std::to_string(rank) + " listed twice");
      seen[static_cast<size_t>(rank)] = true;
      std::string item;
      std::replace(rest.begin(), rest.end(), ',', ' ');
      std::istringstream items(rest);
      while (items >> item) {
        const auto dash = item.find('-');
        if (dash == std::string::npos) {
          lists[static_cast<size_t>(rank)].push_back(number(item));
        } else {
          const int a = number(item.substr(0, dash)), b = number(item.substr(dash + 1));
          if (b < a) fail("empty range " + item);
          for (int e = a; e <= b; ++e) lists[static_cast<size_t>(rank)].push_back(e);
        }
      }
    } else {
      fail("unknown keyword '" + key + "' (expected 'experts' or 'rank')");
    }
  }
  if (num_experts < 0) throw std::invalid_argument(source + ": missing 'experts N' line");
  for (size_t r = 0; r < seen.size(); ++r)
    if (!seen[r]) throw std::invalid_argument(source + ": rank " + std::to_string(r) + " is missing (ranks are numbered from 0)");
  if (lists.empty()) throw std::invalid_argument(source + ": no 'rank' lines");
  return from_lists(num_experts, lists, source);
}

ExpertPlacement ExpertPlacement::load(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot read expert placement file " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return parse(ss.str(), path);
}

ExpertBlock ExpertPlacement::block_of(int rank) const {
  const auto& ids = experts_of(rank);
  return {ids.front(), static_cast<int>(ids.size())};
}

void ExpertPlacement::check_fits(int num_experts, int num_ranks) const {
  if (this->num_experts() != num_experts)
    throw std::invalid_argument("expert placement is for " + std::to_string(this->num_experts()) +
                                " experts but the model has " + std::to_string(num_experts));
  if (this->num_ranks() != num_ranks)
    throw std::invalid_argument("expert placement is for " + std::to_string(this->num_ranks()) + " ranks but " +
                                std::to_string(num_ranks) + " are running");
}

std::string ExpertPlacement::to_text() const {
  std::string s = "experts " + std::to_string(num_experts()) + "\n";
  for (int r = 0; r < num_ranks(); ++r) {
    const ExpertBlock b = block_of(r);
    s += "rank " + std::to_string(r) + ": " + std::to_string(b.first) +
         (b.count > 1 ? "-" + std::to_string(b.first + b.count - 1) : "") + "\n";
  }
  return s;
}

}  // namespace arbiter
