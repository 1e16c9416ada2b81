# Builds llama-cpp-python for text only, in less than half the compile time (see the Makefile's
# demo target). CMake includes this file at the end of llama.cpp's project() call
# (-DCMAKE_PROJECT_llama.cpp_INCLUDE=...), after llama-cpp-python has forced the "common" library on:
# its Python bindings load only libllama and libggml, and common (chat parsers, downloads, an HTTP
# library) was 40% of the compile measured on 2 cores. -DLLAVA_BUILD=OFF drops the multimodal
# library (another 19%), which only the image chat handlers import.
set(LLAMA_BUILD_COMMON OFF CACHE BOOL "llama.cpp: build the common utils library" FORCE)
