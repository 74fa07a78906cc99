/*
 * loadgen: a UDP request/reply load generator, and a trivial echo server to
 * measure its own ceiling.  Built by `make bench`; driven by bench/server.py.
 *
 *   loadgen -e -p PORT [-t SECONDS]
 *       echo every datagram on 127.0.0.1:PORT back to its sender
 *
 *   loadgen -p PORT -x HEX [-t SECONDS] [-w WINDOW] [-s SOCKETS]
 *           [-v OFFSET] [-W WARMUP]
 *       send the request HEX to 127.0.0.1:PORT from SOCKETS sockets, keeping
 *       at most WINDOW requests outstanding (spread over the sockets), for
 *       SECONDS after WARMUP seconds; print one JSON line of counts and rates
 *
 * Why C: one Python process cannot send and receive 100k datagrams a second,
 * so it would measure itself, not the server.  sendmmsg/recvmmsg move up to
 * BATCH datagrams per system call.  Every reply (any datagram that comes back
 * on a socket) frees one slot of the window; a socket whose replies stop for
 * STALL seconds counts its outstanding requests as lost and starts again, so
 * a server that drops requests slows the generator down instead of stopping
 * it.  With -v, a 32-bit counter is written at OFFSET of each request (a STUN
 * transaction ID, our MAPPING token) so that no two requests are the same.
 *
 * Traffic goes to 127.0.0.1 only: the address is not an option.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_SOCKETS 256
#define MAX_REQUEST 1200
#define STALL 0.05

struct source {
    int fd;
    int outstanding;
    double last_progress;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_hex(const char *hex, unsigned char *out, int max)
{
    int n = 0;
    size_t len = strlen(hex);
    if (len % 2)
        return -1;
    for (size_t i = 0; i < len; i += 2) {
        unsigned int byte;
        if (n >= max || sscanf(hex + i, "%2x", &byte) != 1)
            return -1;
        out[n++] = (unsigned char)byte;
    }
    return n;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen -e -p PORT [-t SECONDS]\n"
            "       loadgen -p PORT -x HEX [-t SECONDS] [-w WINDOW] [-s SOCKETS]"
            " [-v OFFSET] [-W WARMUP]\n");
    exit(2);
}

static struct sockaddr_in loopback(int port)
{
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    return sa;
}

/* Echo until SECONDS have passed: the cheapest server there can be. */
static int echo(int port, double seconds)
{
    static unsigned char bufs[BATCH][MAX_REQUEST];
    static struct mmsghdr msgs[BATCH];
    static struct iovec iovs[BATCH];
    static struct sockaddr_in peers[BATCH];
    struct sockaddr_in sa = loopback(port);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        perror("echo: bind");
        return 1;
    }
    /* Wake up now and then so that the time limit holds with no traffic. */
    struct timeval tv = {0, 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    printf("ready\n");
    fflush(stdout);
    double end = now() + seconds;
    long echoed = 0;
    while (now() < end) {
        for (int i = 0; i < BATCH; i++) {
            iovs[i].iov_base = bufs[i];
            iovs[i].iov_len = MAX_REQUEST;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_iov = &iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &peers[i];
            msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0)
            continue;
        for (int i = 0; i < n; i++)
            iovs[i].iov_len = msgs[i].msg_len;
        int off = 0;
        while (off < n) {
            int sent = sendmmsg(fd, msgs + off, n - off, 0);
            if (sent <= 0)
                break;
            off += sent;
        }
        echoed += n;
    }
    fprintf(stderr, "echo: %ld datagrams\n", echoed);
    close(fd);
    return 0;
}

static int generate(int port, const unsigned char *request, int size, double seconds,
                    int window, int nsockets, int vary, double warmup)
{
    static struct source sources[MAX_SOCKETS];
    static unsigned char out[BATCH][MAX_REQUEST], in[BATCH][MAX_REQUEST];
    static struct mmsghdr smsgs[BATCH], rmsgs[BATCH];
    static struct iovec siovs[BATCH], riovs[BATCH];
    struct sockaddr_in sa = loopback(port);
    int per_socket = window / nsockets > 0 ? window / nsockets : 1;
    uint32_t counter = 0;

    for (int s = 0; s < nsockets; s++) {
        int fd = socket(AF_INET, SOCK_DGRAM, 0);
        /* connect(): the kernel fills in the destination and drops
         * datagrams from anyone else, so every datagram read is a reply. */
        if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
            perror("connect");
            return 1;
        }
        sources[s].fd = fd;
    }
    for (int i = 0; i < BATCH; i++) {
        memcpy(out[i], request, size);
        siovs[i].iov_base = out[i];
        siovs[i].iov_len = size;
        smsgs[i].msg_hdr.msg_iov = &siovs[i];
        smsgs[i].msg_hdr.msg_iovlen = 1;
        riovs[i].iov_base = in[i];
        riovs[i].iov_len = MAX_REQUEST;
        rmsgs[i].msg_hdr.msg_iov = &riovs[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }

    long sent = 0, received = 0, lost = 0;
    double start = now(), measured_from = start + warmup, end = measured_from + seconds;
    int measuring = warmup <= 0;
    for (int s = 0; s < nsockets; s++)
        sources[s].last_progress = start;
    for (;;) {
        double t = now();
        if (t >= end)
            break;
        if (!measuring && t >= measured_from) {
            sent = received = lost = 0;
            measuring = 1;
        }
        for (int s = 0; s < nsockets; s++) {
            struct source *src = &sources[s];
            int room = per_socket - src->outstanding;
            if (room > BATCH)
                room = BATCH;
            if (room > 0) {
                if (vary >= 0)
                    for (int i = 0; i < room; i++, counter++)
                        memcpy(out[i] + vary, &counter, sizeof counter);
                int n = sendmmsg(src->fd, smsgs, room, MSG_DONTWAIT);
                if (n > 0) {
                    src->outstanding += n;
                    sent += n;
                }
            }
            int n = recvmmsg(src->fd, rmsgs, BATCH, MSG_DONTWAIT, NULL);
            if (n > 0) {
                received += n;
                src->outstanding -= n;
                if (src->outstanding < 0)
                    src->outstanding = 0;
                src->last_progress = t;
            } else if (src->outstanding > 0 && t - src->last_progress > STALL) {
                lost += src->outstanding;
                src->outstanding = 0;
                src->last_progress = t;
            }
        }
    }
    double elapsed = now() - (warmup > 0 ? measured_from : start);
    printf("{\"sent\": %ld, \"received\": %ld, \"lost\": %ld, \"seconds\": %.3f, "
           "\"sent_per_s\": %.0f, \"received_per_s\": %.0f, \"window\": %d, \"sockets\": %d}\n",
           sent, received, lost, elapsed, sent / elapsed, received / elapsed,
           per_socket * nsockets, nsockets);
    return 0;
}

int main(int argc, char **argv)
{
    int opt, port = 0, echo_mode = 0, window = 128, nsockets = 8, vary = -1, size = 0;
    double seconds = 5, warmup = 0.5;
    static unsigned char request[MAX_REQUEST];
    while ((opt = getopt(argc, argv, "ep:x:t:w:s:v:W:")) != -1) {
        switch (opt) {
        case 'e': echo_mode = 1; break;
        case 'p': port = atoi(optarg); break;
        case 'x': size = parse_hex(optarg, request, MAX_REQUEST); break;
        case 't': seconds = atof(optarg); break;
        case 'w': window = atoi(optarg); break;
        case 's': nsockets = atoi(optarg); break;
        case 'v': vary = atoi(optarg); break;
        case 'W': warmup = atof(optarg); break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || seconds <= 0 || seconds > 600)
        usage();
    if (echo_mode)
        return echo(port, seconds);
    if (size <= 0 || window < 1 || nsockets < 1 || nsockets > MAX_SOCKETS
            || (vary >= 0 && vary + 4 > size))
        usage();
    return generate(port, request, size, seconds, window, nsockets, vary, warmup);
}
