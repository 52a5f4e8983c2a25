# Decides whether the CUDA kernels are built and how.
#
# AUTO compiles them whenever nvcc is found, so a machine without a GPU still proves they
# compile. The CUDA runtime is linked statically: the module then loads on machines with
# no GPU and no driver (the runtime looks for libcuda only when a CUDA call is made).
# Architectures become explicit -gencode flags rather than CMAKE_CUDA_ARCHITECTURES,
# because "90a" (wgmma, setmaxnreg) must be a real sm_90a target and older CMake releases
# do not all spell it the same way.

include(CheckLanguage)

set(FASTINTERNLM_WITH_CUDA OFF)
set(FASTINTERNLM_CUDA_ARCHS_BUILT "")
string(TOUPPER "${FASTINTERNLM_CUDA}" _fil_cuda)

if(_fil_cuda STREQUAL "ON" OR _fil_cuda STREQUAL "1" OR _fil_cuda STREQUAL "AUTO")
  if(NOT CMAKE_CUDA_COMPILER)
    find_program(_fil_nvcc nvcc HINTS /usr/local/cuda/bin ENV CUDA_HOME PATH_SUFFIXES bin)
    if(_fil_nvcc)
      set(CMAKE_CUDA_COMPILER "${_fil_nvcc}")
    endif()
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(FASTINTERNLM_WITH_CUDA ON)
  elseif(_fil_cuda STREQUAL "ON" OR _fil_cuda STREQUAL "1")
    message(FATAL_ERROR "FASTINTERNLM_CUDA=${FASTINTERNLM_CUDA} but no CUDA compiler (nvcc) was found")
  endif()
endif()

if(FASTINTERNLM_WITH_CUDA)
  # Identification compiles a test program; give it one architecture every nvcc we
  # support accepts, then take over the flags ourselves.
  set(CMAKE_CUDA_ARCHITECTURES 80)
  enable_language(CUDA)
  set(CMAKE_CUDA_ARCHITECTURES OFF)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)

  set(FASTINTERNLM_CUDA_GENCODE "")
  set(_fil_lowest "")
  foreach(arch IN LISTS FASTINTERNLM_CUDA_ARCHS)
    string(REGEX REPLACE "^sm_" "" arch "${arch}")
    if(NOT arch MATCHES "^[0-9]+[a-z]?$")
      message(FATAL_ERROR "FASTINTERNLM_CUDA_ARCHS: '${arch}' is not an architecture like 80 or 90a")
    endif()
    list(APPEND FASTINTERNLM_CUDA_GENCODE "-gencode=arch=compute_${arch},code=sm_${arch}")
    list(APPEND FASTINTERNLM_CUDA_ARCHS_BUILT "${arch}")
    if(_fil_lowest STREQUAL "" AND arch MATCHES "^[0-9]+$")
      set(_fil_lowest "${arch}")
    endif()
  endforeach()
  # PTX of the lowest plain architecture lets the driver JIT for newer GPUs.
  if(NOT _fil_lowest STREQUAL "")
    list(APPEND FASTINTERNLM_CUDA_GENCODE "-gencode=arch=compute_${_fil_lowest},code=compute_${_fil_lowest}")
  endif()
  string(REPLACE ";" "," _fil_archs_joined "${FASTINTERNLM_CUDA_ARCHS_BUILT}")
  set(FASTINTERNLM_CUDA_ARCHS_BUILT "${_fil_archs_joined}")
  message(STATUS "fastinternlm: CUDA kernels for ${FASTINTERNLM_CUDA_ARCHS_BUILT} (nvcc ${CMAKE_CUDA_COMPILER_VERSION})")
else()
  message(STATUS "fastinternlm: CPU only (no CUDA kernels)")
endif()

# Extra nvcc flags from the environment arrive as one string ("-Xptxas=-v -lineinfo").
separate_arguments(FASTINTERNLM_NVCC_EXTRA_FLAGS_LIST UNIX_COMMAND "${FASTINTERNLM_NVCC_EXTRA_FLAGS}")

function(fastinternlm_configure_cuda_target target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:${FASTINTERNLM_CUDA_GENCODE} --expt-relaxed-constexpr -lineinfo>
    $<$<COMPILE_LANGUAGE:CUDA>:${FASTINTERNLM_NVCC_EXTRA_FLAGS_LIST}>)
  set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static)
  target_link_libraries(${target} PUBLIC CUDA::cudart_static)
endfunction()
