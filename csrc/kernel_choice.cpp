// The forced kernel choices of this library (kernel_choice.h documents them).
#include "kernel_choice.h"

#include <c10/util/Exception.h>

#include <atomic>

namespace gated_ops {
namespace {

struct Choice {
  const char* name;
  int64_t values[2];  // the values it may be forced to
};
constexpr Choice kChoices[] = {
    {"cpu_lanes", {8, 16}},  {"cpu_skinny", {0, 1}},    {"cpu_widen_gemm", {0, 1}},
    {"cpu_lookahead", {0, 1}}, {"cuda_prefetch", {0, 1}}, {"cuda_ce", {0, 1}},
    {"cuda_routed_gemm", {0, 1}},
};
constexpr int kNumChoices = static_cast<int>(KernelChoice::kCount);
static_assert(sizeof(kChoices) / sizeof(kChoices[0]) == kNumChoices,
              "one entry per KernelChoice, in its order");

std::atomic<int64_t> g_forced[kNumChoices] = {kAutomatic, kAutomatic, kAutomatic, kAutomatic,
                                               kAutomatic, kAutomatic, kAutomatic};

}  // namespace

int64_t forced_kernel(KernelChoice choice) {
  return g_forced[static_cast<int>(choice)].load(std::memory_order_relaxed);
}

int64_t force_kernel(const std::string& name, int64_t value) {
  int i = 0;
  while (i < kNumChoices && name != kChoices[i].name) ++i;
  if (i == kNumChoices) {
    std::string names;
    for (const Choice& c : kChoices) names += std::string(names.empty() ? "" : ", ") + c.name;
    TORCH_CHECK(false, "_force_kernel: unknown kernel choice '", name, "' (known: ", names, ")");
  }
  const Choice& c = kChoices[i];
  TORCH_CHECK(value == kAutomatic || value == c.values[0] || value == c.values[1],
              "_force_kernel: ", name, " takes ", c.values[0], " or ", c.values[1],
              " (or -1: the automatic choice), got ", value);
  return g_forced[i].exchange(value, std::memory_order_relaxed);
}

}  // namespace gated_ops
