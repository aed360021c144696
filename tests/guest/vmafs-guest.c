/* vmafs-guest: the I/O workloads of the vmafs test guest (built with gcc -static).
 *
 *   vmafs-guest writer DEV_A DEV_B SEED
 *       Forever: N += 1; write record N to the counter block of DEV_A and flush; write
 *       pseudo-random data inside the write region of DEV_A; the same for DEV_B.  A
 *       point-in-time copy of both disks therefore has counter(B) == counter(A) or
 *       counter(A) - 1.  Nothing outside [0, VMAFS_REGION_SIZE) is ever written.
 *   vmafs-guest latency DEV COUNT INTERVAL_MS SEED
 *       COUNT timed 4 KiB O_DIRECT writes at random aligned offsets over all of DEV, one
 *       "VMAFS-LAT <microseconds>" line each, then "VMAFS-DONE".
 *
 * The layout constants come from tests/guestimage.py via -D so there is one source of truth.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef VMAFS_RECORD_SIZE
#error "build with -DVMAFS_RECORD_SIZE etc. (see tests/guestimage.py)"
#endif

_Noreturn static void die(const char *what)
{
    dprintf(1, "VMAFS-ERROR %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t rng_state;

static uint64_t rng(void)
{
    /* xorshift64*: cheap, seeded, good enough to defeat zero detection and compression */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static void fill_random(unsigned char *buf, size_t len)
{
    for (size_t i = 0; i + 8 <= len; i += 8) {
        uint64_t v = rng();
        memcpy(buf + i, &v, 8);
    }
}

static void *aligned(size_t len)
{
    void *p;
    if (posix_memalign(&p, 4096, len) != 0)
        die("posix_memalign");
    memset(p, 0, len);
    return p;
}

static void pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
    ssize_t n = pwrite(fd, buf, len, off);
    if (n != (ssize_t)len)
        die("pwrite");
}

static void make_record(unsigned char *rec, unsigned long long n)
{
    char line[64];
    memset(rec, 0, VMAFS_RECORD_SIZE);
    int len = snprintf(line, sizeof line, VMAFS_RECORD_HEAD, n);
    memcpy(rec, line, (size_t)len);
    len = snprintf(line, sizeof line, VMAFS_RECORD_TAIL, n);
    memcpy(rec + VMAFS_RECORD_SIZE - len, line, (size_t)len);
}

static void scribble(int fd, unsigned char *buf)
{
    /* 4 KiB .. VMAFS_SCRIBBLE_MAX at a random 4 KiB-aligned offset inside the region */
    uint64_t blocks = 1 + rng() % (VMAFS_SCRIBBLE_MAX / 4096);
    uint64_t first = VMAFS_SCRIBBLE_START / 4096;
    uint64_t span = VMAFS_REGION_SIZE / 4096 - first - blocks + 1;
    off_t off = (off_t)((first + rng() % span) * 4096);
    fill_random(buf, blocks * 4096);
    pwrite_all(fd, buf, blocks * 4096, off);
}

_Noreturn static void writer(const char *dev_a, const char *dev_b, uint64_t seed)
{
    int fa = open(dev_a, O_RDWR | O_DIRECT);
    if (fa < 0)
        die(dev_a);
    int fb = open(dev_b, O_RDWR | O_DIRECT);
    if (fb < 0)
        die(dev_b);
    unsigned char *rec = aligned(VMAFS_RECORD_SIZE);
    unsigned char *buf = aligned(VMAFS_SCRIBBLE_MAX);
    rng_state = seed ? seed : 1;
    for (unsigned long long n = 1;; n++) {
        make_record(rec, n);
        pwrite_all(fa, rec, VMAFS_RECORD_SIZE, VMAFS_COUNTER_OFFSET);
        if (fdatasync(fa) != 0)
            die("fdatasync a");
        scribble(fa, buf);
        pwrite_all(fb, rec, VMAFS_RECORD_SIZE, VMAFS_COUNTER_OFFSET);
        if (fdatasync(fb) != 0)
            die("fdatasync b");
        scribble(fb, buf);
        if (n % VMAFS_REPORT_EVERY == 0)
            dprintf(1, "VMAFS-COUNT %llu\n", n);
    }
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int latency(const char *dev, long count, long interval_ms, uint64_t seed)
{
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0)
        die(dev);
    off_t size = lseek(fd, 0, SEEK_END);
    if (size < 4096)
        die("device size");
    unsigned char *buf = aligned(4096);
    rng_state = seed ? seed : 1;
    uint64_t blocks = (uint64_t)size / 4096;
    for (long i = 0; i < count; i++) {
        fill_random(buf, 4096);
        off_t off = (off_t)((rng() % blocks) * 4096);
        int64_t t0 = now_us();
        pwrite_all(fd, buf, 4096, off);
        int64_t t1 = now_us();
        dprintf(1, "VMAFS-LAT %lld\n", (long long)(t1 - t0));
        if (interval_ms > 0)
            usleep((useconds_t)interval_ms * 1000);
    }
    dprintf(1, "VMAFS-DONE\n");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "writer") == 0)
        writer(argv[2], argv[3], strtoull(argv[4], NULL, 0));
    if (argc == 6 && strcmp(argv[1], "latency") == 0)
        return latency(argv[2], strtol(argv[3], NULL, 0), strtol(argv[4], NULL, 0),
                       strtoull(argv[5], NULL, 0));
    dprintf(2, "usage: vmafs-guest writer DEV_A DEV_B SEED | latency DEV COUNT INTERVAL_MS SEED\n");
    return 2;
}
