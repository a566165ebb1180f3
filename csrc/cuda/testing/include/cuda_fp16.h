// Test-only stand-in for <cuda_fp16.h>: the CUDA sources compile as C++ on the host (see ../simt_host.h).
#pragma once
#include "../simt_host.h"
