/* The limit of a local resync, for benchmarks/compare_resync.py (built there with
 * gcc -O2 -pthread): read both images at once (one thread each, CHUNK reads),
 * compare 4 KiB blocks, pwrite the runs that differ, fdatasync the target.
 * Prints the bytes written. Usage: limit_resync SRC DST */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define CHUNK (4u << 20)
#define SLOTS 3
#define BLOCK 4096

struct side {
    int fd;
    off_t size;
    char *buf[SLOTS];
    ssize_t got[SLOTS];
    int filled[SLOTS];
    pthread_mutex_t lock;
    pthread_cond_t cond;
};

static void *reader(void *arg)
{
    struct side *s = arg;
    off_t off = 0;
    for (unsigned long n = 0; off < s->size; n++, off += CHUNK) {
        int i = n % SLOTS;
        pthread_mutex_lock(&s->lock);
        while (s->filled[i])
            pthread_cond_wait(&s->cond, &s->lock);
        pthread_mutex_unlock(&s->lock);
        size_t want = s->size - off < CHUNK ? (size_t)(s->size - off) : CHUNK;
        ssize_t got = 0;
        while ((size_t)got < want) {
            ssize_t r = pread(s->fd, s->buf[i] + got, want - got, off + got);
            if (r <= 0) { perror("pread"); exit(2); }
            got += r;
        }
        pthread_mutex_lock(&s->lock);
        s->got[i] = got;
        s->filled[i] = 1;
        pthread_cond_broadcast(&s->cond);
        pthread_mutex_unlock(&s->lock);
    }
    return NULL;
}

static ssize_t take(struct side *s, int i)
{
    pthread_mutex_lock(&s->lock);
    while (!s->filled[i])
        pthread_cond_wait(&s->cond, &s->lock);
    ssize_t got = s->got[i];
    pthread_mutex_unlock(&s->lock);
    return got;
}

static void give(struct side *s, int i)
{
    pthread_mutex_lock(&s->lock);
    s->filled[i] = 0;
    pthread_cond_broadcast(&s->cond);
    pthread_mutex_unlock(&s->lock);
}

int main(int argc, char **argv)
{
    if (argc != 3) { fprintf(stderr, "usage: limit SRC DST\n"); return 2; }
    struct side side[2];
    struct stat st;
    memset(side, 0, sizeof side);
    side[0].fd = open(argv[1], O_RDONLY);
    side[1].fd = open(argv[2], O_RDWR);
    if (side[0].fd < 0 || side[1].fd < 0 || fstat(side[0].fd, &st)) { perror("open"); return 2; }
    if (ftruncate(side[1].fd, st.st_size)) { perror("ftruncate"); return 2; }
    pthread_t t[2];
    for (int k = 0; k < 2; k++) {
        side[k].size = st.st_size;
        pthread_mutex_init(&side[k].lock, NULL);
        pthread_cond_init(&side[k].cond, NULL);
        for (int i = 0; i < SLOTS; i++)
            if (posix_memalign((void **)&side[k].buf[i], 4096, CHUNK)) return 2;
        pthread_create(&t[k], NULL, reader, &side[k]);
    }
    unsigned long long written = 0;
    off_t off = 0;
    for (unsigned long n = 0; off < st.st_size; n++, off += CHUNK) {
        int i = n % SLOTS;
        ssize_t a = take(&side[0], i), b = take(&side[1], i);
        if (a != b) { fprintf(stderr, "short read at %lld\n", (long long)off); return 2; }
        ssize_t run = -1;
        for (ssize_t at = 0; at <= a; at += BLOCK) {
            size_t len = a - at < BLOCK ? (size_t)(a - at) : BLOCK;
            int differs = at < a && memcmp(side[0].buf[i] + at, side[1].buf[i] + at, len) != 0;
            if (differs && run < 0)
                run = at;
            if (!differs && run >= 0) {
                if (pwrite(side[1].fd, side[0].buf[i] + run, at - run, off + run) != at - run) {
                    perror("pwrite"); return 2;
                }
                written += at - run;
                run = -1;
            }
            if (at + BLOCK > a && run >= 0) {  /* the run reaches the chunk's end */
                if (pwrite(side[1].fd, side[0].buf[i] + run, a - run, off + run) != a - run) {
                    perror("pwrite"); return 2;
                }
                written += a - run;
                break;
            }
        }
        give(&side[0], i);
        give(&side[1], i);
    }
    pthread_join(t[0], NULL);
    pthread_join(t[1], NULL);
    if (fdatasync(side[1].fd)) { perror("fdatasync"); return 2; }
    printf("%llu\n", written);
    return 0;
}
