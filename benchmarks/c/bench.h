/* What the two C anchors share: connect from an amqp:// URL, fail loudly, read the clock.
 *
 * Part of workerkit's benchmarks (benchmarks/limit.py builds and runs these). The anchors are
 * deliberately plain librabbitmq code: they stand for "a client that costs almost nothing",
 * the reference workerkit's Python figures are compared with.
 */
#ifndef WK_BENCH_H
#define WK_BENCH_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#if defined(__has_include)
#if __has_include(<rabbitmq-c/amqp.h>)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif

#define WK_CHANNEL 1
#define WK_TIMEOUT_S 60 /* no frame for this long: the broker or the queue is not as expected */

static void wk_die(const char *what, const char *detail) {
  fprintf(stderr, "%s: %s\n", what, detail ? detail : "");
  exit(2);
}

static void wk_check_status(int status, const char *what) {
  if (status != AMQP_STATUS_OK) wk_die(what, amqp_error_string2(status));
}

static void wk_check_reply(amqp_rpc_reply_t reply, const char *what) {
  char detail[160];
  switch (reply.reply_type) {
    case AMQP_RESPONSE_NORMAL:
      return;
    case AMQP_RESPONSE_LIBRARY_EXCEPTION:
      wk_die(what, amqp_error_string2(reply.library_error));
      break;
    case AMQP_RESPONSE_SERVER_EXCEPTION:
      if (reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
        amqp_connection_close_t *m = reply.reply.decoded;
        snprintf(detail, sizeof detail, "connection closed %u %.*s", m->reply_code,
                 (int)m->reply_text.len, (char *)m->reply_text.bytes);
      } else if (reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
        amqp_channel_close_t *m = reply.reply.decoded;
        snprintf(detail, sizeof detail, "channel closed %u %.*s", m->reply_code,
                 (int)m->reply_text.len, (char *)m->reply_text.bytes);
      } else {
        snprintf(detail, sizeof detail, "server method 0x%08x", reply.reply.id);
      }
      wk_die(what, detail);
      break;
    default:
      wk_die(what, "no reply");
  }
}

static double wk_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Open a connection and channel WK_CHANNEL from an amqp:// URL (amqp_parse_url edits its copy). */
static amqp_connection_state_t wk_connect(const char *url) {
  struct amqp_connection_info info;
  char *copy = strdup(url);
  amqp_default_connection_info(&info);
  wk_check_status(amqp_parse_url(copy, &info), "parse url");
  /* "amqp://host:5672/" means the default vhost "/" to pika and aio-pika; librabbitmq reads "" */
  if (info.vhost == NULL || info.vhost[0] == '\0') info.vhost = "/";
  amqp_connection_state_t conn = amqp_new_connection();
  amqp_socket_t *sock = amqp_tcp_socket_new(conn);
  if (!sock) wk_die("socket", "amqp_tcp_socket_new failed");
  wk_check_status(amqp_socket_open(sock, info.host, info.port), "connect");
  wk_check_reply(amqp_login(conn, info.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, info.user,
                            info.password),
                 "login");
  amqp_channel_open(conn, WK_CHANNEL);
  wk_check_reply(amqp_get_rpc_reply(conn), "channel.open");
  free(copy);
  return conn;
}

static void wk_close(amqp_connection_state_t conn) {
  wk_check_reply(amqp_channel_close(conn, WK_CHANNEL, AMQP_REPLY_SUCCESS), "channel.close");
  wk_check_reply(amqp_connection_close(conn, AMQP_REPLY_SUCCESS), "connection.close");
  amqp_destroy_connection(conn);
}

#endif
