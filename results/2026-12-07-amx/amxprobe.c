/* One AMX tile instruction sequence: load a tile config, zero tile 0, release.
   Built here: gcc -O2 -mamx-tile -shared -fPIC -o amxprobe.so amxprobe.c */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* 64-byte aligned: an unaligned config from the stack was a general protection fault on the device's Xeon */
struct tilecfg { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed, aligned(64)));

int probe(void) {
    static struct tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = 16;
    c.colsb[0] = 64;
    _tile_loadconfig(&c);
    _tile_zero(0);
    _tile_release();
    return 42;
}
