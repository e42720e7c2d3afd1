/* A transparent TCP relay in C, for bench/pop3.py only: the fastest a proxy in user space can be
 * on this machine, with no Python at all.  It takes what TPROXY hands it on PORT (0.0.0.0 and ::),
 * connects on to the original destination from the client's own address (IP_TRANSPARENT, as
 * `mailgate relay` does with spoofing on), and moves the bytes with one thread per direction:
 * read()/write() through a 256 KiB buffer ("copy"), or splice() through a pipe ("splice").
 * Not shipped, not a proxy: no limits, no timeouts, no logging; it prints "listening" once.
 *
 *   cc -O2 -pthread -o ceiling_relay ceiling_relay.c && ./ceiling_relay copy 10110
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define CHUNK (256 * 1024)

static int use_splice;

struct pipe_job {
    int from, to;
    int *remaining; /* both directions share it: the last to end closes both sockets */
    pthread_mutex_t *lock;
};

static void copy_bytes(int from, int to) {
    static __thread char buffer[CHUNK];
    for (;;) {
        ssize_t got = read(from, buffer, sizeof buffer);
        if (got <= 0)
            return;
        for (ssize_t sent = 0; sent < got;) {
            ssize_t n = write(to, buffer + sent, (size_t)(got - sent));
            if (n <= 0)
                return;
            sent += n;
        }
    }
}

static void splice_bytes(int from, int to) {
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return;
    fcntl(pipefd[1], F_SETPIPE_SZ, CHUNK);
    for (;;) {
        ssize_t got = splice(from, NULL, pipefd[1], NULL, CHUNK, SPLICE_F_MOVE);
        if (got <= 0)
            break;
        while (got > 0) {
            ssize_t n = splice(pipefd[0], NULL, to, NULL, (size_t)got, SPLICE_F_MOVE);
            if (n <= 0)
                goto done;
            got -= n;
        }
    }
done:
    close(pipefd[0]);
    close(pipefd[1]);
}

static void *pump(void *argument) {
    struct pipe_job *job = argument;
    if (use_splice)
        splice_bytes(job->from, job->to);
    else
        copy_bytes(job->from, job->to);
    shutdown(job->to, SHUT_WR);
    pthread_mutex_lock(job->lock);
    int last = --*job->remaining == 0;
    pthread_mutex_unlock(job->lock);
    if (last) {
        close(job->from);
        close(job->to);
        free(job->remaining);
        pthread_mutex_destroy(job->lock);
        free(job->lock);
    }
    free(job);
    return NULL;
}

static void relay(int client) {
    struct sockaddr_storage peer, original;
    socklen_t peer_len = sizeof peer, original_len = sizeof original;
    int one = 1;
    if (getpeername(client, (struct sockaddr *)&peer, &peer_len) < 0 ||
        getsockname(client, (struct sockaddr *)&original, &original_len) < 0) {
        close(client);
        return;
    }
    int server = socket(peer.ss_family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
    if (server < 0) {
        close(client);
        return;
    }
    if (peer.ss_family == AF_INET) {
        setsockopt(server, SOL_IP, IP_TRANSPARENT, &one, sizeof one);
        ((struct sockaddr_in *)&peer)->sin_port = 0;
    } else {
        setsockopt(server, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof one);
        ((struct sockaddr_in6 *)&peer)->sin6_port = 0;
    }
    setsockopt(server, SOL_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(server, (struct sockaddr *)&peer, peer_len) < 0 ||
        connect(server, (struct sockaddr *)&original, original_len) < 0) {
        perror("ceiling_relay: connect");
        close(server);
        close(client);
        return;
    }
    int *remaining = malloc(sizeof *remaining);
    pthread_mutex_t *lock = malloc(sizeof *lock);
    *remaining = 2;
    pthread_mutex_init(lock, NULL);
    int ends[2][2] = {{client, server}, {server, client}};
    for (int i = 0; i < 2; i++) {
        struct pipe_job *job = malloc(sizeof *job);
        *job = (struct pipe_job){ends[i][0], ends[i][1], remaining, lock};
        pthread_t thread;
        pthread_create(&thread, NULL, pump, job);
        pthread_detach(thread);
    }
}

static int listener(int family, int port) {
    int one = 1, sock = socket(family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP);
    if (sock < 0)
        return -1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_storage address = {0};
    socklen_t length;
    if (family == AF_INET) {
        setsockopt(sock, SOL_IP, IP_TRANSPARENT, &one, sizeof one);
        struct sockaddr_in *in = (struct sockaddr_in *)&address;
        in->sin_family = AF_INET;
        in->sin_port = htons((uint16_t)port);
        length = sizeof *in;
    } else {
        setsockopt(sock, SOL_IPV6, IPV6_TRANSPARENT, &one, sizeof one);
        setsockopt(sock, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&address;
        in6->sin6_family = AF_INET6;
        in6->sin6_port = htons((uint16_t)port);
        length = sizeof *in6;
    }
    if (bind(sock, (struct sockaddr *)&address, length) < 0 || listen(sock, 128) < 0) {
        perror("ceiling_relay: listen");
        exit(1);
    }
    return sock;
}

int main(int argc, char **argv) {
    if (argc != 3 || (strcmp(argv[1], "copy") && strcmp(argv[1], "splice"))) {
        fprintf(stderr, "usage: %s copy|splice PORT\n", argv[0]);
        return 2;
    }
    use_splice = strcmp(argv[1], "splice") == 0;
    int port = atoi(argv[2]);
    struct pollfd listeners[2] = {{listener(AF_INET, port), POLLIN, 0},
                                  {listener(AF_INET6, port), POLLIN, 0}};
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        if (poll(listeners, 2, -1) < 0 && errno != EINTR)
            return 1;
        for (int i = 0; i < 2; i++)
            if (listeners[i].revents & POLLIN) {
                int client = accept4(listeners[i].fd, NULL, NULL, SOCK_CLOEXEC);
                if (client >= 0)
                    relay(client);
            }
    }
}
