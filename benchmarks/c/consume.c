/* C consumer anchor: drain COUNT messages from an existing queue, prefetch PREFETCH, and ack
 * each delivery (ACK_EVERY 1) or every ACK_EVERY-th delivery with multiple=true (and the last).
 *
 *   wk-consume URL QUEUE COUNT PREFETCH ACK_EVERY
 *
 * The clock runs from the first delivery to the ack covering the last one, as in consume.py.
 * Prints one line: RESULT {"count": N, "seconds": S, "rate": R}.
 */
#include "bench.h"
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 6) wk_die("usage", "wk-consume URL QUEUE COUNT PREFETCH ACK_EVERY");
  const char *url = argv[1], *queue = argv[2];
  long count = atol(argv[3]);
  int prefetch = atoi(argv[4]);
  long ack_every = atol(argv[5]);
  if (count < 1 || prefetch < 1 || prefetch > 65535 || ack_every < 1)
    wk_die("usage", "COUNT, PREFETCH (1-65535) and ACK_EVERY must be positive");

  amqp_connection_state_t conn = wk_connect(url);
  amqp_basic_qos(conn, WK_CHANNEL, 0, (uint16_t)prefetch, 0);
  wk_check_reply(amqp_get_rpc_reply(conn), "basic.qos");
  amqp_basic_consume(conn, WK_CHANNEL, amqp_cstring_bytes(queue), amqp_empty_bytes, 0, 0, 0,
                     amqp_empty_table);
  wk_check_reply(amqp_get_rpc_reply(conn), "basic.consume");

  struct timeval timeout = {WK_TIMEOUT_S, 0};
  double first = 0.0, last = 0.0;
  long seen = 0;
  while (seen < count) {
    amqp_envelope_t envelope;
    amqp_maybe_release_buffers(conn);
    amqp_rpc_reply_t reply = amqp_consume_message(conn, &envelope, &timeout, 0);
    if (reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
        reply.library_error == AMQP_STATUS_TIMEOUT) {
      fprintf(stderr, "consume: no delivery for %d s after %ld of %ld\n", WK_TIMEOUT_S, seen,
              count);
      return 3;
    }
    wk_check_reply(reply, "consume");
    if (seen == 0) first = wk_now();
    seen++;
    uint64_t tag = envelope.delivery_tag;
    amqp_destroy_envelope(&envelope);
    if (ack_every == 1) {
      wk_check_status(amqp_basic_ack(conn, WK_CHANNEL, tag, 0), "basic.ack");
    } else if (seen == count || tag % (uint64_t)ack_every == 0) {
      wk_check_status(amqp_basic_ack(conn, WK_CHANNEL, tag, 1), "basic.ack");
    }
  }
  last = wk_now();
  /* Outside the clock. RabbitMQ 3.10 quorum queues were seen to return some messages whose
   * acks (ack each) left just before channel.close: 3-68 of 300 here. A pause lets the queue
   * apply them; the caller still checks that the queue is empty afterwards. */
  usleep(500 * 1000);
  wk_close(conn);
  double seconds = last - first;
  if (seconds <= 0) seconds = 1e-9;
  printf("RESULT {\"count\": %ld, \"seconds\": %.6f, \"rate\": %.1f}\n", count, seconds,
         (double)count / seconds);
  return 0;
}
