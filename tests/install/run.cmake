# SPDX-License-Identifier: Apache-2.0
# Installs the build tree into WORK_DIR/prefix, configures, builds and runs the consumer against it. SANITIZE: the
# build's BITEP_SANITIZE, which the consumer links too (the sanitizer's runtime must come before libbitep).
file(REMOVE_RECURSE ${WORK_DIR})
set(SANITIZE_LINK)
if(SANITIZE)
  set(SANITIZE_LINK -fsanitize=${SANITIZE})
endif()
foreach(step
    "${CMAKE_COMMAND};--install;${BUILD_DIR};--prefix;${WORK_DIR}/prefix"
    "${CMAKE_COMMAND};-S;${SRC_DIR};-B;${WORK_DIR}/build;-DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix;-DBITEP_VERSION=${BITEP_VERSION};-DCMAKE_EXE_LINKER_FLAGS=${SANITIZE_LINK}"
    "${CMAKE_COMMAND};--build;${WORK_DIR}/build"
    "${WORK_DIR}/build/consumer")
  execute_process(COMMAND ${step} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${step}\n${out}\n${err}")
  endif()
endforeach()
message(STATUS "${out}")
