# SPDX-License-Identifier: Apache-2.0
# Installs the build tree into WORK_DIR/prefix, then builds the consumer against it and runs it. MODE cmake (the
# default): a CMake project, find_package(bitep); MODE cxx: the same from a C++ project (cxx/). MODE pkgconfig:
# C_COMPILER on consumer.c with the flags `pkg-config --cflags --libs bitep` gives from the installed bitep.pc (LIBDIR:
# its directory under the prefix), after the installed tree was moved, as a package manager may move it. SANITIZE: the
# build's BITEP_SANITIZE, which the consumer links too (the sanitizer's runtime must come before libbitep).
file(REMOVE_RECURSE ${WORK_DIR})
set(SANITIZE_LINK)
if(SANITIZE)
  set(SANITIZE_LINK -fsanitize=${SANITIZE})
endif()

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  set(step_out "${out}" PARENT_SCOPE)
endfunction()

run_step(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${WORK_DIR}/prefix)

if(MODE STREQUAL "pkgconfig")
  find_program(PKG_CONFIG NAMES pkg-config pkgconf)
  if(NOT PKG_CONFIG)
    message(STATUS "pkg-config not found: the bitep.pc check needs it (apt: pkg-config)")
    return()
  endif()
  file(RENAME ${WORK_DIR}/prefix ${WORK_DIR}/moved)
  set(ENV{PKG_CONFIG_PATH} ${WORK_DIR}/moved/${LIBDIR}/pkgconfig)
  run_step(${PKG_CONFIG} --exact-version=${BITEP_VERSION} bitep)
  run_step(${PKG_CONFIG} --cflags --libs bitep)
  string(STRIP "${step_out}" flags)
  separate_arguments(flags UNIX_COMMAND "${flags}")
  run_step(${C_COMPILER} -std=c99 ${SRC_DIR}/consumer.c ${flags} ${SANITIZE_LINK}
           -Wl,-rpath,${WORK_DIR}/moved/${LIBDIR} -o ${WORK_DIR}/consumer)
  run_step(${WORK_DIR}/consumer)
  message(STATUS "pkg-config flags: ${flags}\n${step_out}")
  return()
endif()

# MODE cxx: the C++ consumer (cxx/: a project with C++ alone, through bitep.hpp and bitep_mpi.hpp).
set(PROJECT_DIR ${SRC_DIR})
set(CONSUMER consumer)
if(MODE STREQUAL "cxx")
  set(PROJECT_DIR ${SRC_DIR}/cxx)
  set(CONSUMER consumer_cxx)
endif()
# The C++ consumer twice: from a project with C++ alone (the package's MPI dependency without the C language), and
# with C and C++ (MPI::MPI_C, which has no MPI C++ bindings library, linked into C++ code that includes <mpi.h>).
set(LANGUAGE_SETS "C")
if(MODE STREQUAL "cxx")
  set(LANGUAGE_SETS "CXX" "C,CXX")
endif()
foreach(languages IN LISTS LANGUAGE_SETS)
  file(REMOVE_RECURSE ${WORK_DIR}/build)
  run_step(${CMAKE_COMMAND} -S ${PROJECT_DIR} -B ${WORK_DIR}/build -DCMAKE_PREFIX_PATH=${WORK_DIR}/prefix
           -DBITEP_VERSION=${BITEP_VERSION} -DCONSUMER_LANGUAGES=${languages}
           -DCMAKE_EXE_LINKER_FLAGS=${SANITIZE_LINK})
  run_step(${CMAKE_COMMAND} --build ${WORK_DIR}/build)
  run_step(${WORK_DIR}/build/${CONSUMER})
  message(STATUS "languages ${languages}: ${step_out}")
endforeach()
