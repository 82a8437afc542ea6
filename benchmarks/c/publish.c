/* C publisher anchor: publish COUNT persistent, mandatory ~100-byte JSON messages through
 * EXCHANGE with ROUTING_KEY, with publisher confirms and at most IN_FLIGHT unconfirmed.
 *
 *   wk-publish URL EXCHANGE ROUTING_KEY COUNT IN_FLIGHT
 *
 * One warm-up message is published and confirmed first (not timed), as publish.py does, so the
 * queue ends up holding COUNT + 1 messages. A nack or a returned (unroutable) message fails the
 * run. Prints one line: RESULT {"count": N, "seconds": S, "rate": R}.
 */
#include "bench.h"

#define BODY_SIZE 100

static long confirmed = 0;     /* messages confirmed so far */
static uint64_t acked_to = 0;  /* every tag <= acked_to is confirmed */
static unsigned char *single;  /* single (multiple=false) confirms above acked_to */

/* The same document as benchmarks/common.payload(i): JSON padded to about BODY_SIZE bytes. */
static size_t body_for(long i, char *out, size_t cap) {
  char head[96];
  int n = snprintf(head, sizeof head, "{\"order_id\":%ld,\"email\":\"customer@example.com\"", i);
  int pad = BODY_SIZE - n - (int)strlen(",\"note\":\"\"}");
  if (pad < 0) pad = 0;
  int len = snprintf(out, cap, "%s,\"note\":\"%.*s\"}", head, pad,
                     "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
  return (size_t)len;
}

static void publish(amqp_connection_state_t conn, const char *exchange, const char *key, long i) {
  char body[BODY_SIZE * 2];
  size_t len = body_for(i, body, sizeof body);
  amqp_basic_properties_t props;
  props._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
  props.content_type = amqp_cstring_bytes("application/json");
  props.delivery_mode = 2;
  amqp_bytes_t bytes = {len, body};
  wk_check_status(amqp_basic_publish(conn, WK_CHANNEL, amqp_cstring_bytes(exchange),
                                     amqp_cstring_bytes(key), 1, 0, &props, bytes),
                  "basic.publish");
}

static void confirm(uint64_t tag, int multiple) {
  if (multiple) {
    for (uint64_t t = acked_to + 1; t <= tag; t++)
      if (!single[t]) confirmed++;
    acked_to = tag > acked_to ? tag : acked_to;
  } else if (tag > acked_to && !single[tag]) {
    single[tag] = 1;
    confirmed++;
  }
}

/* Wait for the next frame and account for it: a confirm, or a failure that ends the run. */
static void read_confirm(amqp_connection_state_t conn) {
  amqp_frame_t frame;
  struct timeval timeout = {WK_TIMEOUT_S, 0};
  amqp_maybe_release_buffers(conn);
  int status = amqp_simple_wait_frame_noblock(conn, &frame, &timeout);
  if (status == AMQP_STATUS_TIMEOUT) wk_die("publish", "no confirm within the timeout");
  wk_check_status(status, "wait for confirm");
  if (frame.frame_type != AMQP_FRAME_METHOD) wk_die("publish", "unexpected content frame");
  switch (frame.payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
      amqp_basic_ack_t *ack = frame.payload.method.decoded;
      confirm(ack->delivery_tag, ack->multiple);
      return;
    }
    case AMQP_BASIC_NACK_METHOD:
      wk_die("publish", "the broker nacked a message");
      break;
    case AMQP_BASIC_RETURN_METHOD:
      wk_die("publish", "a message was returned unroutable (is the queue bound?)");
      break;
    case AMQP_CHANNEL_CLOSE_METHOD:
    case AMQP_CONNECTION_CLOSE_METHOD:
      wk_die("publish", "the broker closed the channel or connection");
      break;
    default:
      wk_die("publish", "unexpected method");
  }
}

int main(int argc, char **argv) {
  if (argc != 6) wk_die("usage", "wk-publish URL EXCHANGE ROUTING_KEY COUNT IN_FLIGHT");
  const char *url = argv[1], *exchange = argv[2], *key = argv[3];
  long count = atol(argv[4]);
  long in_flight = atol(argv[5]);
  if (count < 1 || in_flight < 1) wk_die("usage", "COUNT and IN_FLIGHT must be positive");
  single = calloc((size_t)count + 2, 1);
  if (!single) wk_die("memory", "calloc");

  amqp_connection_state_t conn = wk_connect(url);
  amqp_confirm_select(conn, WK_CHANNEL);
  wk_check_reply(amqp_get_rpc_reply(conn), "confirm.select");

  publish(conn, exchange, key, 0); /* warm-up, delivery tag 1, not timed */
  while (confirmed < 1) read_confirm(conn);

  long published = 1, total = count + 1;
  double start = wk_now();
  while (confirmed < total) {
    while (published < total && published - confirmed < in_flight) publish(conn, exchange, key, published++);
    read_confirm(conn);
  }
  double seconds = wk_now() - start;
  wk_close(conn);
  free(single);
  if (seconds <= 0) seconds = 1e-9;
  printf("RESULT {\"count\": %ld, \"seconds\": %.6f, \"rate\": %.1f}\n", count, seconds,
         (double)count / seconds);
  return 0;
}
