/* AMX permission probe, no Python: prints the XCOMP permission mask (ARCH_GET_XCOMP_PERM) before and
   after asking (unless argv[1] is "noask"), then runs one tile sequence (ldtilecfg from a 64-byte
   aligned config, tilezero, tilerelease). Built here: gcc -O1 -static -mamx-tile -o amxperm amxperm.c */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_GET_XCOMP_PERM 0x1022
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

struct tilecfg { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } __attribute__((packed, aligned(64)));

int main(int argc, char **argv) {
    unsigned long mask = 0;
    syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mask);
    printf("permitted xfeatures before: 0x%lx (XTILEDATA bit 18: %lu)\n", mask, (mask >> 18) & 1);
    if (argc < 2 || strcmp(argv[1], "noask") != 0) {
        long rc = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
        syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &mask);
        printf("ARCH_REQ_XCOMP_PERM rc %ld; permitted after: 0x%lx (bit 18: %lu)\n", rc, mask, (mask >> 18) & 1);
    }
    fflush(stdout);
    static struct tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    c.rows[0] = 16;
    c.colsb[0] = 64;
    _tile_loadconfig(&c);
    _tile_zero(0);
    _tile_release();
    printf("tile sequence ran\n");
    return 0;
}
