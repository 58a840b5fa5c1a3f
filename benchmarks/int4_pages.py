"""Whether the kind of page or the prefetch holds the AVX2 int4 decode loop back from memory (issue 21, ≥ 75% of the
streaming bandwidth on Zen 3): gemv.c's inner loop (benchmarks/int4_activations.py's int16 kernel) and a plain
integer read over 1.0 GB held in 4 KB anonymous pages, transparent huge pages, a file mapping (as moelm maps a
checkpoint) and a file mapping with MADV_HUGEPAGE, then the same loop with other software prefetches, on 1 and 2
threads. Rounds alternate the variants (the host's noise falls on all alike); the best of each. It prints how much
of each mapping the kernel mapped with 2 MB pages (AnonHugePages, FilePmdMapped). Nothing in moelm changed from
these: docs/benchmarks.md has the figures.

    python benchmarks/int4_pages.py [DIR]       # needs gcc and an AVX2 CPU; writes two 1.0 GB files in DIR (/tmp)
"""
import subprocess
import sys
import tempfile
from pathlib import Path

from int4_activations import SOURCE

MAIN = r"""
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
/* the prefetch today's gemv.c issues (every 32 bytes, 4 KB ahead into L1) and others, once a 64-byte line */
INT16(pf_gemv, __builtin_prefetch(w + s * 32 + 4096, 0, 3))
INT16(pf_l1_4k, if (s & 1) __builtin_prefetch(w + s * 32 + 4096, 0, 3))
INT16(pf_l2_8k, if (s & 1) __builtin_prefetch(w + s * 32 + 8192, 0, 2))
INT16(pf_l2_16k, if (s & 1) __builtin_prefetch(w + s * 32 + 16384, 0, 2))
static void huge(const char *what) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r"); char line[256];
    while (f && fgets(line, sizeof line, f))
        if (strstr(line, "AnonHugePages") || strstr(line, "FilePmdMapped")) printf("%s: %s", what, line);
    if (f) fclose(f);
}
static uint8_t *mapped(const char *dir, int k, const uint8_t *data, size_t n, int advise) {
    char path[4096]; snprintf(path, sizeof path, "%s/int4_pages_%d", dir, k);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(path); exit(1); }
    for (size_t off = 0; off < n;) { ssize_t w = write(fd, data + off, n - off); if (w <= 0) exit(1); off += w; }
    fsync(fd); posix_fadvise(fd, 0, n, POSIX_FADV_DONTNEED); close(fd);
    fd = open(path, O_RDONLY); uint8_t *p = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0); close(fd); unlink(path);
    if (p == MAP_FAILED) { perror("mmap"); exit(1); }
    if (advise) madvise(p, n, MADV_HUGEPAGE);
    volatile uint8_t t = 0; for (size_t i = 0; i < n; i += 4096) t += p[i];  /* faulted in (read from the file) */
    return p;
}
int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "/tmp";
    long rows = 768 * 1024; size_t n = rows * (I / 2);
    int16_t *x = malloc(I * 2); for (int i = 0; i < I; i++) x[i] = rand() % 32767 - 16383;
    float *sc = malloc(rows * 2 * G * sizeof(float)); for (long i = 0; i < rows * 2 * G; i++) sc[i] = 1e-3f;
    uint8_t *buf[4]; const char *kinds[] = {"anonymous, 4 KB pages", "anonymous, huge pages", "file mapping",
                                             "file mapping, MADV_HUGEPAGE"};
    buf[0] = aligned_alloc(1 << 21, n); buf[1] = aligned_alloc(1 << 21, n);
    madvise(buf[0], n, MADV_NOHUGEPAGE); madvise(buf[1], n, MADV_HUGEPAGE);
    for (size_t i = 0; i < n; i++) buf[0][i] = buf[1][i] = (uint8_t)(i * 7);
    huge("anonymous (one of two buffers in huge pages)");
    buf[2] = mapped(dir, 2, buf[0], n, 0); buf[3] = mapped(dir, 3, buf[0], n, 1);
    huge("after the two file mappings");
    Dot pfs[] = {pf_gemv, pf_l1_4k, pf_l2_8k, pf_l2_16k};
    const char *pnames[] = {"every 32 bytes, 4 KB ahead into L1 (gemv.c)", "once a line, 4 KB into L1",
                            "once a line, 8 KB into L2", "once a line, 16 KB into L2"};
    double kern[4][2], rd[4][2], pf[4][2], t;
    for (int k = 0; k < 4; k++) for (int j = 0; j < 2; j++) kern[k][j] = rd[k][j] = pf[k][j] = 1e9;
    for (int round = 0; round < 6; round++) for (int th = 1; th <= 2; th++) for (int k = 0; k < 4; k++) {
        if ((t = rate(int16, x, buf[k], sc, rows, th, 1)) < kern[k][th - 1]) kern[k][th - 1] = t;
        if ((t = read_rate((const uint32_t *)buf[k], n / 4, th, 1)) < rd[k][th - 1]) rd[k][th - 1] = t;
        if ((t = rate(pfs[k], x, buf[0], sc, rows, th, 1)) < pf[k][th - 1]) pf[k][th - 1] = t;
    }
    printf("\n| pages (GB/s) | int4 loop, 1 thread | 2 threads | plain read, 1 thread | 2 threads |\n");
    printf("|---|---|---|---|---|\n");
    for (int k = 0; k < 4; k++)
        printf("| %s | %.1f | %.1f | %.1f | %.1f |\n", kinds[k], n / kern[k][0] / 1e9, n / kern[k][1] / 1e9,
               n / rd[k][0] / 1e9, n / rd[k][1] / 1e9);
    printf("\n| prefetch, 4 KB pages (GB/s) | 1 thread | 2 threads |\n|---|---|---|\n");
    for (int k = 0; k < 4; k++) printf("| %s | %.1f | %.1f |\n", pnames[k], n / pf[k][0] / 1e9, n / pf[k][1] / 1e9);
    return 0;
}
"""


def main() -> int:
    source = SOURCE[:SOURCE.index("int main(void)")] + MAIN
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "p.c", Path(tmp) / "p"
        src.write_text(source)
        subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(src), "-lm"], check=True)
        return subprocess.run([str(exe), *sys.argv[1:2]]).returncode


if __name__ == "__main__":
    sys.exit(main())
