// Greedy decode of an edgekit .pte through ExecuTorch's C++ runtime, the way an app runs it:
// no Python, no torch, the program memory-mapped without mlock. Built by bench/et_cpp.py
// against the libraries and headers the executorch wheel ships (share/cmake).
//
//   et_decode [--data WEIGHTS.ptd] [--kernels LIBRARY]... MODEL.pte DECODE_STEPS REPEATS TOKEN_ID...
//
// --kernels loads a shared library whose static initializers register more kernels (the
// wheel's LLM custom ops, llama::custom_sdpa / update_cache, for programs that call them; the
// wheel builds them only into a library linking libtorch and libpython, which then come along,
// resident before the program loads: status_before_load).
//
// After a warm-up, feeds the prompt ids (in chunks of get_max_seq_len), then DECODE_STEPS greedy
// steps, REPEATS times from position 0 -- the workload of bench_runtimes.measure_generation --
// and prints one JSON line: times, the last round's tokens, the first prefill's top logits, and
// /proc/self/status after load and after decode. Peak RSS while decoding is VmHWM after writing
// 5 to /proc/self/clear_refs as each decode loop starts.

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::runtime::EValue;

namespace {

constexpr int64_t kTopLogits = 5;  // of the first prefill, for comparing with another runtime

double now_s() {
  using clock = std::chrono::steady_clock;
  return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
}

// VmHWM, VmRSS, RssAnon, RssFile in bytes.
std::map<std::string, long long> proc_status() {
  std::map<std::string, long long> out;
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    for (const char* key : {"VmHWM", "VmRSS", "RssAnon", "RssFile"}) {
      std::string prefix = std::string(key) + ":";
      if (line.rfind(prefix, 0) == 0) {
        out[key] = std::atoll(line.c_str() + prefix.size()) * 1024;
      }
    }
  }
  return out;
}

void reset_peak_rss() {
  std::ofstream("/proc/self/clear_refs") << "5";
}

std::string json_status(const std::map<std::string, long long>& status) {
  std::ostringstream out;
  out << "{";
  const char* sep = "";
  for (const auto& [key, value] : status) {
    out << sep << "\"" << key << "\": " << value;
    sep = ", ";
  }
  out << "}";
  return out.str();
}

template <typename T>
std::string json_list(const std::vector<T>& values) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < values.size(); ++i) {
    out << (i ? ", " : "") << values[i];
  }
  out << "]";
  return out.str();
}

std::string json_top(const std::vector<std::pair<int64_t, float>>& top) {
  std::ostringstream out;
  out.precision(9);
  out << "[";
  for (size_t i = 0; i < top.size(); ++i) {
    out << (i ? ", " : "") << "[" << top[i].first << ", " << top[i].second << "]";
  }
  out << "]";
  return out.str();
}

[[noreturn]] void fail(const std::string& what, executorch::runtime::Error error) {
  std::fprintf(stderr, "et_decode: %s failed (executorch error %d)\n", what.c_str(), static_cast<int>(error));
  std::exit(1);
}

template <typename T>
T ok(executorch::runtime::Result<T>&& result, const std::string& what) {
  if (!result.ok()) {
    fail(what, result.error());
  }
  return std::move(result.get());
}

int64_t scalar_method(Module& module, const std::string& name) {
  auto outputs = ok(module.execute(name), name);
  return outputs.at(0).toInt();
}

// Feeds `ids` at `position` (token_embedding, then text_decoder) and returns the argmax of the
// last position's logits.
int64_t forward(Module& module, std::vector<int64_t> ids, int64_t position,
                std::vector<std::pair<int64_t, float>>* top = nullptr) {
  const auto count = static_cast<executorch::aten::SizesType>(ids.size());
  auto tokens = from_blob(ids.data(), {1, count}, ScalarType::Long);
  auto embeds = ok(module.execute("token_embedding", EValue(tokens)), "token_embedding");
  std::vector<int64_t> positions(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    positions[i] = position + static_cast<int64_t>(i);
  }
  auto cache_position = from_blob(positions.data(), {count}, ScalarType::Long);
  auto outputs = ok(module.execute("text_decoder", {embeds.at(0), EValue(cache_position)}), "text_decoder");
  const auto& logits = outputs.at(0).toTensor();
  const int64_t vocab = logits.size(logits.dim() - 1);
  const float* row = logits.const_data_ptr<float>() + (logits.numel() - vocab);
  if (top != nullptr) {
    std::vector<int64_t> order(vocab);
    for (int64_t i = 0; i < vocab; ++i) {
      order[i] = i;
    }
    const int64_t k = std::min(kTopLogits, vocab);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [row](int64_t a, int64_t b) { return row[a] > row[b]; });
    for (int64_t i = 0; i < k; ++i) {
      top->emplace_back(order[i], row[order[i]]);
    }
  }
  return std::max_element(row, row + vocab) - row;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string data_path;
  while (args.size() >= 2 && (args[0] == "--data" || args[0] == "--kernels")) {
    if (args[0] == "--data") {
      data_path = args[1];
    } else if (dlopen(args[1].c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::fprintf(stderr, "et_decode: cannot load kernels %s: %s\n", args[1].c_str(), dlerror());
      return 1;
    }
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() < 4) {
    std::fprintf(stderr, "usage: et_decode [--data WEIGHTS.ptd] [--kernels LIBRARY]... MODEL.pte DECODE_STEPS "
                 "REPEATS TOKEN_ID...\n");
    return 2;
  }
  const std::string path = args[0];
  const int steps = std::stoi(args[1]);
  const int repeats = std::stoi(args[2]);
  std::vector<int64_t> prompt;
  for (size_t i = 3; i < args.size(); ++i) {
    prompt.push_back(std::stoll(args[i]));
  }

  // XNNPACK as ExecuTorch's LLM runner sets it (extension/llm/runner): one workspace shared by a
  // program's delegate calls, packed weights in the weight cache. The build's default differs
  // between builds (this wheel's: a global workspace, no weight cache); a workspace per
  // delegate call costs +165 MiB at 4 layers (RESULTS.md section 10). Keys from backends/xnnpack's
  // XNNPACKBackend.h, which the wheel does not ship.
  executorch::runtime::BackendOptions<2> xnnpack;
  xnnpack.set_option("workspace_sharing_mode", 1);  // WorkspaceSharingMode::PerModel
  xnnpack.set_option("weight_cache_enabled", true);
  if (auto error = executorch::runtime::set_option("XnnpackBackend", xnnpack.view());
      error != executorch::runtime::Error::Ok) {
    fail("setting XNNPACK's options", error);
  }

  const auto before_load = proc_status();
  const double load_start = now_s();
  // Mapped, not locked: pages come and go with use, as on a device without mlock rights.
  auto module = data_path.empty() ? std::make_unique<Module>(path, Module::LoadMode::Mmap)
                                  : std::make_unique<Module>(path, data_path, Module::LoadMode::Mmap);
  for (const char* method : {"token_embedding", "text_decoder"}) {
    if (auto error = module->load_method(method); error != executorch::runtime::Error::Ok) {
      fail(std::string("load_method ") + method, error);
    }
  }
  const int64_t chunk = scalar_method(*module, "get_max_seq_len");
  const double load_s = now_s() - load_start;
  const auto after_load = proc_status();

  // Warm-up (first-run allocations, kernel selection), as bench_runtimes.measure_generation does:
  // a short prefill and one single-token step.
  if (prompt.size() > 1) {
    const size_t warm = std::min<size_t>(8, prompt.size() - 1);
    forward(*module, std::vector<int64_t>(prompt.begin(), prompt.begin() + warm), 0);
    forward(*module, {prompt[warm]}, static_cast<int64_t>(warm));
  }

  std::vector<double> prefill_s, decode_s;
  std::vector<int64_t> generated;
  std::vector<std::pair<int64_t, float>> top;
  long long decode_peak = 0;
  long long life_peak = proc_status()["VmHWM"];
  std::map<std::string, long long> after_decode;
  for (int round = 0; round < repeats; ++round) {
    // Positions past the fed ones are masked as future, so starting again at 0 needs no reset.
    int64_t position = 0;
    int64_t next = 0;
    double start = now_s();
    for (size_t first = 0; first < prompt.size(); first += static_cast<size_t>(chunk)) {
      const size_t last = std::min(prompt.size(), first + static_cast<size_t>(chunk));
      const bool final_chunk = last == prompt.size();
      next = forward(*module, std::vector<int64_t>(prompt.begin() + first, prompt.begin() + last), position,
                     round == 0 && final_chunk ? &top : nullptr);
      position += static_cast<int64_t>(last - first);
    }
    prefill_s.push_back(now_s() - start);
    life_peak = std::max(life_peak, proc_status()["VmHWM"]);
    reset_peak_rss();
    generated.clear();
    start = now_s();
    for (int step = 0; step < steps; ++step) {
      generated.push_back(next);
      next = forward(*module, {next}, position++);
    }
    decode_s.push_back(now_s() - start);
    after_decode = proc_status();
    decode_peak = std::max(decode_peak, after_decode["VmHWM"]);
  }

  std::printf(
      "{\"runtime\": \"executorch-cpp\", \"load_s\": %.6f, \"max_seq_len\": %lld, \"prompt_tokens\": %zu, "
      "\"decode_steps\": %d, \"status_before_load\": %s, \"status_after_load\": %s, \"status_after_decode\": %s, "
      "\"decode_peak_rss_bytes\": %lld, \"life_peak_rss_bytes\": %lld, \"prefill_s\": %s, \"decode_s\": %s, "
      "\"tokens\": %s, \"prefill_top\": %s}\n",
      load_s, static_cast<long long>(chunk), prompt.size(), steps, json_status(before_load).c_str(),
      json_status(after_load).c_str(), json_status(after_decode).c_str(), decode_peak,
      std::max(life_peak, decode_peak), json_list(prefill_s).c_str(), json_list(decode_s).c_str(),
      json_list(generated).c_str(), json_top(top).c_str());
  return 0;
}
