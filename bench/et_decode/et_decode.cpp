// Greedy decode of an edgekit .pte through ExecuTorch's C++ runtime, the way an app runs it:
// no Python, no torch, the program memory-mapped without mlock. Built by bench/et_cpp.py
// against the libraries and headers the executorch wheel ships (share/cmake).
//
//   et_decode [--data WEIGHTS.ptd] [--kernels LIBRARY]... [--lean-memory] MODEL.pte DECODE_STEPS REPEATS TOKEN_ID...
//
// --kernels loads a shared library whose static initializers register more kernels (the
// wheel's LLM custom ops, llama::custom_sdpa / update_cache, for programs that call them; the
// wheel builds them only into a library linking libtorch and libpython, which then come along,
// resident before the program loads: status_before_load).
//
// --lean-memory runs the program as an app can with ExecuTorch's public API, instead of the stock
// Module's defaults: each method's planned memory comes from anonymous mappings the app passes to
// load_method (pages become resident when the method first writes them; Module allocates
// zero-filled vectors, so a KV cache sized to the whole context is resident from load), and the
// program's file mappings are marked MADV_RANDOM after loading (a table lookup reads its rows, not
// the ~128 KiB of read-ahead around them), as edgekit's Python runner does.
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
#include <executorch/runtime/core/hierarchical_allocator.h>
#include <executorch/runtime/core/span.h>

#include <dlfcn.h>
#include <sys/mman.h>

#include <cerrno>
#include <climits>
#include <cstring>

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

// One method's planned memory in anonymous mappings: zero pages until written.
class LazyPlannedMemory {
 public:
  explicit LazyPlannedMemory(const executorch::runtime::MethodMeta& meta) {
    for (size_t i = 0; i < meta.num_memory_planned_buffers(); ++i) {
      const auto size = static_cast<size_t>(ok(meta.memory_planned_buffer_size(i), "planned buffer size"));
      void* data = mmap(nullptr, std::max<size_t>(size, 1), PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (data == MAP_FAILED) {
        std::fprintf(stderr, "et_decode: cannot map %zu bytes of planned memory: %s\n", size, std::strerror(errno));
        std::exit(1);
      }
      mappings_.emplace_back(data, std::max<size_t>(size, 1));
      spans_.emplace_back(static_cast<uint8_t*>(data), size);
    }
    allocator_ = std::make_unique<executorch::runtime::HierarchicalAllocator>(
        executorch::runtime::Span<executorch::runtime::Span<uint8_t>>(spans_.data(), spans_.size()));
  }
  ~LazyPlannedMemory() {
    for (const auto& [data, size] : mappings_) {
      munmap(data, size);
    }
  }
  LazyPlannedMemory(const LazyPlannedMemory&) = delete;
  LazyPlannedMemory& operator=(const LazyPlannedMemory&) = delete;
  executorch::runtime::HierarchicalAllocator* allocator() { return allocator_.get(); }

 private:
  std::vector<std::pair<void*, size_t>> mappings_;
  std::vector<executorch::runtime::Span<uint8_t>> spans_;
  std::unique_ptr<executorch::runtime::HierarchicalAllocator> allocator_;
};

// MADV_RANDOM on every mapping of `path` (the program's segments, mapped as methods load).
void advise_random_access(const std::string& path) {
  char resolved[PATH_MAX];
  if (realpath(path.c_str(), resolved) == nullptr) {
    return;
  }
  std::ifstream maps("/proc/self/maps");
  std::string line;
  while (std::getline(maps, line)) {
    const auto slash = line.find('/');
    if (slash == std::string::npos || line.compare(slash, std::string::npos, resolved) != 0) {
      continue;
    }
    uintptr_t start = 0, end = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &start, &end) == 2) {
      madvise(reinterpret_cast<void*>(start), end - start, MADV_RANDOM);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  std::string data_path;
  bool lean_memory = false;
  while (!args.empty() && args[0].rfind("--", 0) == 0) {
    if (args[0] == "--lean-memory") {
      lean_memory = true;
      args.erase(args.begin());
      continue;
    }
    if (args.size() < 2 || (args[0] != "--data" && args[0] != "--kernels")) {
      break;  // not an option: the usage line below
    }
    if (args[0] == "--data") {
      data_path = args[1];
    } else if (dlopen(args[1].c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      std::fprintf(stderr, "et_decode: cannot load kernels %s: %s\n", args[1].c_str(), dlerror());
      return 1;
    }
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() < 4) {
    std::fprintf(stderr, "usage: et_decode [--data WEIGHTS.ptd] [--kernels LIBRARY]... [--lean-memory] MODEL.pte "
                 "DECODE_STEPS REPEATS TOKEN_ID...\n");
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

  std::vector<std::unique_ptr<LazyPlannedMemory>> planned;  // declared first: outlives the methods
  const auto before_load = proc_status();
  const double load_start = now_s();
  // Mapped, not locked: pages come and go with use, as on a device without mlock rights.
  auto module = data_path.empty() ? std::make_unique<Module>(path, Module::LoadMode::Mmap)
                                  : std::make_unique<Module>(path, data_path, Module::LoadMode::Mmap);
  for (const char* method : {"token_embedding", "text_decoder"}) {
    executorch::runtime::HierarchicalAllocator* planned_memory = nullptr;
    if (lean_memory) {
      planned.push_back(std::make_unique<LazyPlannedMemory>(ok(module->method_meta(method), "method_meta")));
      planned_memory = planned.back()->allocator();
    }
    if (auto error = module->load_method(method, planned_memory); error != executorch::runtime::Error::Ok) {
      fail(std::string("load_method ") + method, error);
    }
  }
  if (lean_memory) {
    advise_random_access(path);
    if (!data_path.empty()) {
      advise_random_access(data_path);
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
