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
 *   vmafs-guest replay FILE_A FILE_B STEPS SEED   (on the host, for the tests)
 *       The disks' content after the first STEPS writes of `writer DEV_A DEV_B SEED`: iteration
 *       N is the 4 steps record A, scribble A, record B, scribble B.  FILE_A and FILE_B are
 *       existing regular files, at least the write region long, holding the disks as they were
 *       before the writer started; only the blocks the steps wrote are changed (pwrite).
 *       Prints "STEP <kind> <offset> <length>" for the last step (kind record_a, scribble_a,
 *       record_b, scribble_b; "STEP none 0 0" when STEPS is 0).
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
#include <sys/stat.h>
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

static off_t scribble_place(uint64_t *blocks)
{
    /* 4 KiB .. VMAFS_SCRIBBLE_MAX at a random 4 KiB-aligned offset inside the region */
    *blocks = 1 + rng() % (VMAFS_SCRIBBLE_MAX / 4096);
    uint64_t first = VMAFS_SCRIBBLE_START / 4096;
    uint64_t span = VMAFS_REGION_SIZE / 4096 - first - *blocks + 1;
    return (off_t)((first + rng() % span) * 4096);
}

static void scribble(int fd, unsigned char *buf)
{
    uint64_t blocks;
    off_t off = scribble_place(&blocks);
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

/* replay: the writer's sequence without its ~8.5 KiB of random draws per scribble.  The RNG
 * step is linear over GF(2), so skipping the 512 draws that fill one 4 KiB block is a 64x64 bit
 * matrix, applied with one 256-entry table per state byte.  The forward pass only remembers,
 * for each block of the region, the RNG state its last writer filled it from; the data of the
 * surviving blocks is generated at the end.
 */
#define REPLAY_BLOCKS (VMAFS_REGION_SIZE / 4096)
_Static_assert(VMAFS_COUNTER_OFFSET + VMAFS_RECORD_SIZE <= VMAFS_SCRIBBLE_START,
               "replay assumes the counter record lies before the scribbles");

static uint64_t skip_table[8][256];

static void skip_init(void)
{
    uint64_t col[64];
    for (int i = 0; i < 64; i++) {
        rng_state = 1ULL << i;
        for (int j = 0; j < 4096 / 8; j++)
            rng();
        col[i] = rng_state;
    }
    for (int k = 0; k < 8; k++) {
        skip_table[k][0] = 0;
        for (unsigned v = 1; v < 256; v++)
            skip_table[k][v] = skip_table[k][v & (v - 1)] ^ col[8 * k + __builtin_ctz(v)];
    }
}

static uint64_t skip_block(uint64_t x)
{
    uint64_t y = 0;
    for (int k = 0; k < 8; k++)
        y ^= skip_table[k][(x >> (8 * k)) & 0xff];
    return y;
}

struct replay_disk {
    int fd;
    unsigned long long record; /* last counter record written, 0: none */
    unsigned char written[REPLAY_BLOCKS];
    uint64_t from[REPLAY_BLOCKS]; /* RNG state the block's last fill started with */
};

static void replay_open(struct replay_disk *d, const char *path)
{
    struct stat st;
    memset(d, 0, sizeof *d);
    d->fd = open(path, O_RDWR);
    if (d->fd < 0)
        die(path);
    if (fstat(d->fd, &st) != 0)
        die(path);
    if (!S_ISREG(st.st_mode) || st.st_size < VMAFS_REGION_SIZE) {
        errno = EINVAL;
        die("replay needs regular files at least the write region long");
    }
}

static off_t replay_scribble(struct replay_disk *d, uint64_t *blocks)
{
    off_t off = scribble_place(blocks);
    for (uint64_t i = 0; i < *blocks; i++) {
        d->written[off / 4096 + i] = 1;
        d->from[off / 4096 + i] = rng_state;
        rng_state = skip_block(rng_state);
    }
    return off;
}

static void replay_finish(struct replay_disk *d, unsigned char *buf)
{
    if (d->record > 0) {
        make_record(buf, d->record);
        pwrite_all(d->fd, buf, VMAFS_RECORD_SIZE, VMAFS_COUNTER_OFFSET);
    }
    for (uint64_t i = 0; i < REPLAY_BLOCKS; i++) {
        if (!d->written[i])
            continue;
        rng_state = d->from[i];
        fill_random(buf, 4096);
        pwrite_all(d->fd, buf, 4096, (off_t)(i * 4096));
    }
    if (close(d->fd) != 0)
        die("close");
}

static int replay(const char *file_a, const char *file_b, unsigned long long steps,
                  uint64_t seed)
{
    static struct replay_disk disk[2];
    static const char *const kinds[4] = {"record_a", "scribble_a", "record_b", "scribble_b"};
    unsigned char *buf = aligned(VMAFS_RECORD_SIZE > 4096 ? VMAFS_RECORD_SIZE : 4096);
    const char *kind = "none";
    off_t off = 0;
    uint64_t len = 0;

    skip_init();
    rng_state = 0x9e3779b97f4a7c15ULL;
    uint64_t slow = rng_state;
    for (int j = 0; j < 4096 / 8; j++)
        rng();
    if (rng_state != skip_block(slow)) {
        errno = EINVAL;
        die("replay self-check");
    }
    replay_open(&disk[0], file_a);
    replay_open(&disk[1], file_b);
    rng_state = seed ? seed : 1;
    for (unsigned long long k = 0; k < steps; k++) {
        struct replay_disk *d = &disk[(k / 2) % 2];
        kind = kinds[k % 4];
        if (k % 2 == 0) {
            d->record = k / 4 + 1;
            off = VMAFS_COUNTER_OFFSET;
            len = VMAFS_RECORD_SIZE;
        } else {
            off = replay_scribble(d, &len);
            len *= 4096;
        }
    }
    replay_finish(&disk[0], buf);
    replay_finish(&disk[1], buf);
    dprintf(1, "STEP %s %lld %llu\n", kind, (long long)off, (unsigned long long)len);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "writer") == 0)
        writer(argv[2], argv[3], strtoull(argv[4], NULL, 0));
    if (argc == 6 && strcmp(argv[1], "latency") == 0)
        return latency(argv[2], strtol(argv[3], NULL, 0), strtol(argv[4], NULL, 0),
                       strtoull(argv[5], NULL, 0));
    if (argc == 6 && strcmp(argv[1], "replay") == 0)
        return replay(argv[2], argv[3], strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0));
    dprintf(2, "usage: vmafs-guest writer DEV_A DEV_B SEED | latency DEV COUNT INTERVAL_MS SEED"
               " | replay FILE_A FILE_B STEPS SEED\n");
    return 2;
}
