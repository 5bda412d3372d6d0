// The CUDA caching allocator's current byte counts, behind a C ABI for Rust.
//
// libtorch exposes these statistics only as C++: torch.cuda.memory_allocated() and
// memory_reserved() read the same two fields. The device-generic allocator interface keeps
// this file free of CUDA headers; a libtorch without CUDA simply has no allocator to ask.

#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>
#include <exception>

namespace {

constexpr auto kAggregate =
    static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);

}  // namespace

// Writes the bytes held by live tensors and the bytes the allocator holds from the driver
// (live or cached) on CUDA device `device`, and returns 0. Returns -1, writing nothing, when
// there is no CUDA allocator, it has not been initialised yet, or the device does not exist.
extern "C" int rebeld_cuda_memory(int device, int64_t* allocated, int64_t* reserved) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (!allocator->initialized()) {
      return -1;
    }
    const auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    *allocated = stats.allocated_bytes[kAggregate].current;
    *reserved = stats.reserved_bytes[kAggregate].current;
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}
