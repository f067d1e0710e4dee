/* kubenet-lab's DNS client: one lookup, or a paced stream of lookups, through the C library's own
 * getaddrinfo(3). Built twice by images/dnsclient.py: with gcc against glibc (Debian's resolver) and with
 * musl-gcc, static, against musl (Alpine's resolver). Same source, so any difference in the queries they
 * send is the library's.
 *
 *   dnsclient once NAME              print each address, then "# rc=N ms=F"; exit 0 found, 2 no such name, 1 other
 *   dnsclient load NAME RATE SECONDS  RATE lookups per second for SECONDS; print one JSON line of results
 */
#define _POSIX_C_SOURCE 200809L
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* AF_UNSPEC with one socket type: the same question `getent ahosts` asks (A and AAAA), one line per address. */
static int lookup(const char *name, int print) {
    struct addrinfo hints, *res = NULL, *ai;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    if (rc == 0 && print) {
        char text[INET6_ADDRSTRLEN];
        for (ai = res; ai; ai = ai->ai_next) {
            const void *addr = ai->ai_family == AF_INET ? (const void *)&((struct sockaddr_in *)ai->ai_addr)->sin_addr
                                                         : (const void *)&((struct sockaddr_in6 *)ai->ai_addr)->sin6_addr;
            if (inet_ntop(ai->ai_family, addr, text, sizeof text))
                printf("%s\n", text);
        }
    }
    if (res)
        freeaddrinfo(res);
    return rc;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "once") == 0) {
        double start = now();
        int rc = lookup(argv[2], 1);
        printf("# rc=%d ms=%.3f\n", rc, (now() - start) * 1000);
        return rc == 0 ? 0 : (rc == EAI_NONAME ? 2 : 1);
    }
    if (argc == 5 && strcmp(argv[1], "load") == 0) {
        double rate = atof(argv[3]), seconds = atof(argv[4]);
        if (rate <= 0 || seconds <= 0 || rate * seconds > 1e6) {
            fprintf(stderr, "dnsclient: RATE and SECONDS must be positive\n");
            return 64;
        }
        size_t cap = (size_t)(rate * seconds) + 1, n = 0, failures = 0, slow = 0;
        double *ms = calloc(cap, sizeof *ms);
        double start = now(), interval = 1.0 / rate;
        for (n = 0; n < cap - 1; n++) {
            double due = start + n * interval, t = now();
            if (due > start + seconds)
                break;
            if (due > t) {
                struct timespec wait = {(time_t)(due - t), (long)((due - t - (time_t)(due - t)) * 1e9)};
                nanosleep(&wait, NULL);
            }
            double begin = now();
            if (lookup(argv[2], 0) != 0)
                failures++;
            ms[n] = (now() - begin) * 1000;
            if (ms[n] >= 1000)
                slow++; /* a lookup over a second on a LAN: a query went unanswered and was sent again */
        }
        double elapsed = now() - start;
        qsort(ms, n, sizeof *ms, cmp);
        printf("{\"lookups\": %zu, \"failures\": %zu, \"over_1s\": %zu, \"seconds\": %.3f, \"ms\": [", n, failures, slow, elapsed);
        for (size_t i = 0; i < n; i++)
            printf("%s%.3f", i ? ", " : "", ms[i]);
        printf("]}\n");
        return 0;
    }
    fprintf(stderr, "usage: dnsclient once NAME | dnsclient load NAME RATE SECONDS\n");
    return 64;
}
