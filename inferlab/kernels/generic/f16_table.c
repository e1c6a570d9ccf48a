/* Every fp16 value as fp32, for the kernels that convert a block's fp16 scale in each step of a hot
 * loop: a load from here takes no vector instruction, where F16C's conversion and the broadcast
 * after it take two of the shuffle port, which bounds one-row decoding on Intel cores. Filled as the
 * library loads; this file is compiled with the portable flags only, so the filling runs on any CPU.
 */
#include "../common.h"

float il_f16_table[65536];

__attribute__((constructor)) static void il_fill_f16_table(void) {
    for (int h = 0; h < 65536; h++) il_f16_table[h] = il_f16_to_f32((uint16_t)h);
}
