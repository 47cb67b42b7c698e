#include "parallel/expert_placement.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <map>
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

// "0-3 5 7-8": ascending ids as ranges.
std::string ranges(const std::vector<int>& ids) {
  std::string s;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    s += (s.empty() ? "" : " ") + std::to_string(ids[i]) + (j > i ? "-" + std::to_string(ids[j]) : "");
    i = j + 1;
  }
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
  RankLists lists(static_cast<size_t>(num_ranks));
  const int base = num_experts / num_ranks, extra = num_experts % num_ranks;
  int next = 0;
  for (int r = 0; r < num_ranks; ++r)
    for (int i = 0; i < base + (r < extra ? 1 : 0); ++i) lists[static_cast<size_t>(r)].push_back(next++);
  return from_lists(num_experts, lists, "contiguous placement");
}

ExpertPlacement::LayerMap ExpertPlacement::build(int num_experts, const RankLists& lists, const std::string& source) {
  if (lists.empty()) throw std::invalid_argument(source + ": no ranks");
  if (static_cast<int>(lists.size()) > num_experts)
    throw std::invalid_argument(source + ": " + std::to_string(lists.size()) + " ranks but only " +
                                std::to_string(num_experts) + " experts; every rank must own at least one expert");
  LayerMap m;
  m.owner.assign(static_cast<size_t>(num_experts), -1);
  m.local.assign(static_cast<size_t>(num_experts), -1);
  for (size_t r = 0; r < lists.size(); ++r) {
    std::vector<int> ids = lists[r];
    std::sort(ids.begin(), ids.end());
    if (ids.empty()) throw std::invalid_argument(source + ": rank " + std::to_string(r) + " owns no experts");
    for (size_t i = 0; i < ids.size(); ++i) {
      const int e = ids[i];
      if (e < 0 || e >= num_experts)
        throw std::invalid_argument(source + ": rank " + std::to_string(r) + " lists expert " + std::to_string(e) +
                                    ", outside 0.." + std::to_string(num_experts - 1));
      int& owner = m.owner[static_cast<size_t>(e)];
      if (owner >= 0)
        throw std::invalid_argument(source + ": expert " + std::to_string(e) + " is listed " +
                                    (owner == static_cast<int>(r) ? "twice for rank " + std::to_string(r)
                                                                  : "for rank " + std::to_string(owner) +
                                                                        " and again for rank " + std::to_string(r)));
      owner = static_cast<int>(r);
      m.local[static_cast<size_t>(e)] = static_cast<int>(i);
    }
    m.experts.push_back(std::move(ids));
  }
  std::vector<int> missing;
  for (int e = 0; e < num_experts; ++e)
    if (m.owner[static_cast<size_t>(e)] < 0) missing.push_back(e);
  if (!missing.empty())
    throw std::invalid_argument(source + ": no rank owns expert" + (missing.size() > 1 ? "s " : " ") + describe(missing));
  return m;
}

ExpertPlacement ExpertPlacement::from_lists(int num_experts, const RankLists& lists, const std::string& source) {
  if (num_experts <= 0) throw std::invalid_argument(source + ": the number of experts must be positive");
  ExpertPlacement p;
  p.num_experts_ = num_experts;
  p.source_ = source;
  p.layers_.push_back(build(num_experts, lists, source));
  return p;
}

ExpertPlacement ExpertPlacement::from_layer_lists(int num_experts, const std::vector<RankLists>& layers,
                                                  const std::string& source) {
  if (num_experts <= 0) throw std::invalid_argument(source + ": the number of experts must be positive");
  if (layers.empty()) throw std::invalid_argument(source + ": no layers");
  ExpertPlacement p;
  p.num_experts_ = num_experts;
  p.source_ = source;
  p.per_layer_ = true;
  for (size_t l = 0; l < layers.size(); ++l) {
    p.layers_.push_back(build(num_experts, layers[l], source + ": layer " + std::to_string(l)));
    if (layers[l].size() != layers[0].size())
      throw std::invalid_argument(source + ": layer " + std::to_string(l) + " has " + std::to_string(layers[l].size()) +
                                  " ranks but layer 0 has " + std::to_string(layers[0].size()) +
                                  " (every layer must name the same ranks)");
  }
  return p;
}

ExpertPlacement ExpertPlacement::parse(const std::string& text, const std::string& source) {
  std::istringstream in(text);
  std::string line;
  int line_no = 0, num_experts = -1, num_layers = -1;
  // One set of rank lines: the default (before any 'layer' line) or a layer's.
  struct Section {
    RankLists lists;
    std::vector<bool> seen;
    int first_line = 0;
  };
  Section defaults;
  std::map<int, Section> layer_sections;
  Section* current = &defaults;
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
  auto single = [&](std::istringstream& words, const std::string& what) {
    std::string n, rest;
    if (!(words >> n) || (words >> rest)) fail("expected '" + what + " N'");
    return number(n);
  };
  while (std::getline(in, line)) {
    ++line_no;
    if (const auto hash = line.find('#'); hash != std::string::npos) line.erase(hash);
    std::istringstream words(line);
    std::string key;
    if (!(words >> key)) continue;
    if (key == "experts") {
      if (num_experts >= 0) fail("'experts' given twice");
      num_experts = single(words, "experts");
    } else if (key == "layers") {
      if (num_layers >= 0) fail("'layers' given twice");
      if (!layer_sections.empty()) fail("'layers N' must come before the first 'layer' line");
      num_layers = single(words, "layers");
      if (num_layers == 0) fail("'layers' must be positive");
    } else if (key == "layer") {
      if (num_layers < 0) fail("a 'layer' section needs a 'layers N' line before it (the model's layer count)");
      const int layer = single(words, "layer");
      if (layer >= num_layers)
        fail("layer " + std::to_string(layer) + " outside 0.." + std::to_string(num_layers - 1) + " ('layers " +
             std::to_string(num_layers) + "')");
      if (layer_sections.count(layer)) fail("layer " + std::to_string(layer) + " given twice");
      current = &layer_sections[layer];
      current->first_line = line_no;
    } else if (key == "rank") {
      std::string rest;
      std::getline(words, rest);
      const auto colon = rest.find(':');
      if (colon == std::string::npos) fail("expected 'rank R: experts'");
      std::string r = rest.substr(0, colon);
      r.erase(std::remove_if(r.begin(), r.end(), [](unsigned char c) { return std::isspace(c); }), r.end());
      rest.erase(0, colon + 1);
      const int rank = number(r);
      if (rank >= static_cast<int>(current->seen.size())) {
        current->seen.resize(static_cast<size_t>(rank) + 1, false);
        current->lists.resize(static_cast<size_t>(rank) + 1);
      }
      if (current->seen[static_cast<size_t>(rank)]) fail("rank " + std::to_string(rank) + " listed twice");
      current->seen[static_cast<size_t>(rank)] = true;
      std::string item;
      std::replace(rest.begin(), rest.end(), ',', ' ');
      std::istringstream items(rest);
      auto& list = current->lists[static_cast<size_t>(rank)];
      while (items >> item) {
        const auto dash = item.find('-');
        if (dash == std::string::npos) {
          list.push_back(number(item));
        } else {
          const int a = number(item.substr(0, dash)), b = number(item.substr(dash + 1));
          if (b < a) fail("empty range " + item);
          if (b - a > 1000000) fail("range " + item + " too long");
          for (int e = a; e <= b; ++e) list.push_back(e);
        }
        if (list.size() > 1000000) fail("too many experts");
      }
    } else {
      fail("unknown keyword '" + key + "' (expected 'experts', 'rank', 'layers' or 'layer')");
    }
  }
  if (num_experts < 0) throw std::invalid_argument(source + ": missing 'experts N' line");
  auto check_ranks = [&](const Section& s, const std::string& where) {
    for (size_t r = 0; r < s.seen.size(); ++r)
      if (!s.seen[r])
        throw std::invalid_argument(source + ":" + where + "rank " + std::to_string(r) +
                                    " is missing (ranks are numbered from 0)");
  };
  check_ranks(defaults, " ");
  if (num_layers < 0) {
    if (defaults.lists.empty()) throw std::invalid_argument(source + ": no 'rank' lines");
    return from_lists(num_experts, defaults.lists, source);
  }
  std::vector<RankLists> layers;
  for (int l = 0; l < num_layers; ++l) {
    const auto it = layer_sections.find(l);
    if (it == layer_sections.end()) {
      if (defaults.lists.empty())
        throw std::invalid_argument(source + ": layer " + std::to_string(l) +
                                    " has no section and there are no default 'rank' lines before the first 'layer'");
      layers.push_back(defaults.lists);
      continue;
    }
    check_ranks(it->second, std::to_string(it->second.first_line) + ": layer " + std::to_string(l) + ": ");
    if (it->second.lists.empty())
      throw std::invalid_argument(source + ":" + std::to_string(it->second.first_line) + ": layer " + std::to_string(l) +
                                  " has no 'rank' lines");
    layers.push_back(it->second.lists);
  }
  return from_layer_lists(num_experts, layers, source);
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
  if (ids.back() - ids.front() + 1 != static_cast<int>(ids.size()))
    throw std::logic_error(source_ + ": rank " + std::to_string(rank) + "'s experts are not one contiguous run");
  return {ids.front(), static_cast<int>(ids.size())};
}

int ExpertPlacement::max_experts_of(int rank) const {
  size_t most = 0;
  for (const LayerMap& m : layers_) most = std::max(most, m.experts.at(static_cast<size_t>(rank)).size());
  return static_cast<int>(most);
}

void ExpertPlacement::check_fits(int num_experts, int num_layers, int num_ranks) const {
  if (this->num_experts() != num_experts)
    throw std::invalid_argument("expert placement " + source_ + " is for " + std::to_string(this->num_experts()) +
                                " experts but the model has " + std::to_string(num_experts) +
                                " per layer (a placement made for another model?)");
  if (per_layer_ && this->num_layers() != num_layers)
    throw std::invalid_argument("expert placement " + source_ + " is for " + std::to_string(this->num_layers()) +
                                " layers but the model has " + std::to_string(num_layers) +
                                " (a placement made for another model?)");
  if (this->num_ranks() != num_ranks)
    throw std::invalid_argument("expert placement " + source_ + " is for " + std::to_string(this->num_ranks()) +
                                " ranks but " + std::to_string(num_ranks) + " are running (it names ranks 0.." +
                                std::to_string(this->num_ranks() - 1) + ")");
}

std::string ExpertPlacement::to_text() const {
  std::string s = "experts " + std::to_string(num_experts()) + "\n";
  auto ranks_text = [&](const LayerMap& m) {
    for (size_t r = 0; r < m.experts.size(); ++r) s += "rank " + std::to_string(r) + ": " + ranges(m.experts[r]) + "\n";
  };
  if (!per_layer_) {
    ranks_text(layers_.at(0));
    return s;
  }
  s += "layers " + std::to_string(layers_.size()) + "\n";
  for (size_t l = 0; l < layers_.size(); ++l) {
    s += "layer " + std::to_string(l) + "\n";
    ranks_text(layers_[l]);
  }
  return s;
}

}  // namespace arbiter
