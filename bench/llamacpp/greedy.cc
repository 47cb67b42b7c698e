// greedy: the greedy continuation of a prompt given as token ids, through llama.cpp's library, printed
// as {"tokens": [...]} like `arbiter generate`, so that the GGUF file to_gguf.py wrote can be checked
// against Arbiter on the same checkpoint before the two are timed side by side (compare.sh).
//
// Usage: greedy MODEL.gguf 1,2,3 N_NEW [LOGITS.f32]
//   LOGITS.f32: also write the logits at the prompt's last position (float32, vocabulary order), to
//   compare with `arbiter logits` where the continuations part.
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    std::fprintf(stderr, "usage: %s MODEL.gguf 1,2,3 N_NEW [LOGITS.f32]\n", argv[0]);
    return 2;
  }
  std::vector<llama_token> prompt;
  std::stringstream ids(argv[2]);
  for (std::string id; std::getline(ids, id, ',');) prompt.push_back(static_cast<llama_token>(std::stol(id)));
  const int n_new = std::atoi(argv[3]);
  llama_backend_init();
  llama_model_params mp = llama_model_default_params();
  mp.n_gpu_layers = 0;
  llama_model* model = llama_model_load_from_file(argv[1], mp);
  if (!model) return 1;
  llama_context_params cp = llama_context_default_params();
  cp.n_ctx = 512;
  cp.n_threads = cp.n_threads_batch = 2;
  llama_context* ctx = llama_init_from_model(model, cp);
  if (!ctx) return 1;
  const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
  std::vector<llama_token> out;
  llama_batch batch = llama_batch_get_one(prompt.data(), static_cast<int32_t>(prompt.size()));
  llama_token next = 0;
  for (int i = 0; i < n_new; ++i) {
    if (llama_decode(ctx, batch) != 0) return 1;
    const float* logits = llama_get_logits_ith(ctx, -1);
    if (i == 0 && argc == 5) {
      std::FILE* f = std::fopen(argv[4], "wb");
      if (!f || std::fwrite(logits, sizeof(float), static_cast<size_t>(n_vocab), f) != static_cast<size_t>(n_vocab)) return 1;
      std::fclose(f);
    }
    next = 0;
    for (int t = 1; t < n_vocab; ++t)
      if (logits[t] > logits[next]) next = t;
    out.push_back(next);
    batch = llama_batch_get_one(&next, 1);
  }
  std::printf("{\"tokens\":[");
  for (size_t i = 0; i < out.size(); ++i) std::printf("%s%d", i ? "," : "", out[i]);
  std::printf("]}\n");
  llama_free(ctx);
  llama_model_free(model);
  return 0;
}
