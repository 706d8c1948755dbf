// SPDX-License-Identifier: Apache-2.0
// Handle lifetime and layout queries.
#include "src/ep/handle.h"

#include "src/check.h"

namespace bitep::ep {

bitepResult_t check_handle(bitepHandle_t h, bitepGroup_t group) {
  BITEP_ARG_CHECK(h != nullptr, "handle is NULL");
  BITEP_ARG_CHECK(h->magic == kHandleMagic,
                  "handle (%p) is not a live bitep handle (destroyed, or not from "
                  "bitepDispatch)",
                  static_cast<void*>(h));
  {
    std::lock_guard<std::mutex> lock(h->life->mu);
    if (!h->life->alive)
      BITEP_FAIL(bitepInvalidUsage,
                 "the handle's group was destroyed: the handle's buffers are gone; only "
                 "bitepHandleDestroy may still be called on it");
  }
  if (group != nullptr && group != h->group)
    BITEP_FAIL(bitepInvalidArgument, "handle belongs to another group (%p) than the one given (%p)",
               static_cast<const void*>(h->group), static_cast<void*>(group));
  return bitepSuccess;
}

void destroy_handle(bitepHandle_t h) {
  if (h == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(h->life->mu);
    if (h->life->alive)
      for (Block& b : h->blocks) h->life->pool->release(&b, h->last_stream);
  }
  h->blocks.clear();
  h->magic = 0;
  delete h;
}

}  // namespace bitep::ep

extern "C" {

bitepResult_t bitepHandleGetLayout(bitepHandle_t handle, bitepDispatchLayout_t* layout) {
  return bitep::guard("bitepHandleGetLayout", [&]() -> bitepResult_t {
    BITEP_CHECK(bitep::ep::check_handle(handle, nullptr));
    BITEP_ARG_CHECK(layout != nullptr, "layout is NULL");
    *layout = handle->layout;
    return bitepSuccess;
  });
}

bitepResult_t bitepHandleDestroy(bitepHandle_t handle) {
  return bitep::guard("bitepHandleDestroy", [&]() -> bitepResult_t {
    if (handle == nullptr) return bitepSuccess;
    BITEP_ARG_CHECK(handle->magic == bitep::ep::kHandleMagic,
                    "handle (%p) is not a live bitep handle (destroyed "
                    "twice?)",
                    static_cast<void*>(handle));
    bitep::ep::destroy_handle(handle);
    return bitepSuccess;
  });
}

}  // extern "C"
