#!/usr/bin/env bash
# Packs what the GPU machine may lack into .deps/ (git-ignored), to be carried with a device call:
#   .deps/ompi   Open MPI 4.1 (mpirun, mpicxx, libs, components, help files) mirrored under usr/,
#                relocatable through OPAL_PREFIX; components that need UCX/OFI/PSM/verbs are left out
#   .deps/gtest  GoogleTest headers, static libraries and CMake package
#   .deps/nccl   nccl.h only: used when the machine has libnccl but no header
#   .deps/syslib runtime libraries Open MPI needs; device-check.sh links in only those the
#                machine lacks
# Taken from this machine's packages (scripts/common.sh installs them). device-check.sh uses a
# piece only when the machine has none of its own.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="$ROOT/.deps"
ML=/usr/lib/x86_64-linux-gnu
rm -rf "$D" && mkdir -p "$D"

# ---- Open MPI ----------------------------------------------------------------------------------
O="$D/ompi/usr"
mkdir -p "$O/bin" "$O/lib/x86_64-linux-gnu/openmpi/lib/openmpi3" "$O/share"
cp -L /usr/bin/orterun /usr/bin/opal_wrapper /usr/bin/ompi_info "$O/bin/"
ln -s orterun "$O/bin/mpirun"
ln -s orterun "$O/bin/mpiexec"
for w in mpicc mpicxx mpic++; do ln -s opal_wrapper "$O/bin/$w"; done
OL="$O/lib/x86_64-linux-gnu/openmpi/lib"
for l in libmpi.so.40 libmpi_cxx.so.40 libopen-pal.so.40 libopen-rte.so.40 libmca_common_sm.so.40 \
         libmca_common_ompio.so.41 libmca_common_monitoring.so.50 libpmix.so.2 libhwloc.so.15 \
         libevent_core-2.1.so.7 libevent_pthreads-2.1.so.7; do
  cp -L "$ML/$l" "$OL/"
done
ln -s libmpi.so.40 "$OL/libmpi.so"
ln -s libmpi_cxx.so.40 "$OL/libmpi_cxx.so"
ln -s libopen-pal.so.40 "$OL/libopen-pal.so"
ln -s libopen-rte.so.40 "$OL/libopen-rte.so"
for c in "$ML"/openmpi/lib/openmpi3/*.so; do
  case "$(basename "$c")" in
    *ucx* | *ofi* | *psm* | *openib* | *_cm.so | *flux* | *slurm* | *io_romio* | *verbs*) continue ;;
  esac
  cp -L "$c" "$OL/openmpi3/"
done
cp -rL "$ML/openmpi/include" "$O/lib/x86_64-linux-gnu/openmpi/"
cp -rL /usr/share/openmpi "$O/share/"
mkdir -p "$O/lib/x86_64-linux-gnu/pmix2/lib"
cp -rL "$ML/pmix2/lib/pmix" "$O/lib/x86_64-linux-gnu/pmix2/lib/"
rm -f "$O/lib/x86_64-linux-gnu/pmix2/lib/pmix/"*slurm*
[[ -d "$ML/pmix2/share" ]] && cp -rL "$ML/pmix2/share" "$O/lib/x86_64-linux-gnu/pmix2/"

# ---- system libraries Open MPI links against (device-check.sh uses each only if missing there) --
mkdir -p "$D/syslib"
for l in libnuma.so.1 libudev.so.1 libatomic.so.1 libmunge.so.2 libz.so.1 libuuid.so.1; do
  [[ -e "$ML/$l" ]] && cp -L "$ML/$l" "$D/syslib/"
done

# ---- GoogleTest ---------------------------------------------------------------------------------
G="$D/gtest"
mkdir -p "$G/lib" "$G/include"
cp "$ML"/libgtest.a "$ML"/libgtest_main.a "$ML"/libgmock.a "$ML"/libgmock_main.a "$G/lib/"
cp -r /usr/include/gtest /usr/include/gmock "$G/include/"

# ---- nccl.h ---------------------------------------------------------------------------------------
mkdir -p "$D/nccl/include"
cp /usr/local/cuda/include/nccl.h "$D/nccl/include/"

grep -qx '/.deps/' "$ROOT/.git/info/exclude" 2>/dev/null || echo '/.deps/' >>"$ROOT/.git/info/exclude"
du -sh "$D"
