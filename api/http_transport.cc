#include "api/http_transport.h"

#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <future>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <unordered_map>
#include <vector>

#include "api/connection_watch.h"
#include "api/console.h"
#include "api/errors.h"
#include "api/json_io.h"
#include "api/percent_decode.h"

namespace arbiter::api {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using tcp = asio::ip::tcp;
using Clock = std::chrono::steady_clock;

constexpr size_t kHeaderLimit = 64 << 10;           // bytes of a request head
constexpr auto kLingerOnClose = std::chrono::seconds(2);  // reading what a closed-on client still sends
constexpr auto kAcceptBackoff = std::chrono::milliseconds(20);

std::chrono::steady_clock::duration seconds(double s) {
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(s));
}

// Handler threads: complete requests wait in a bounded queue (holding no thread) until one is free.
class HandlerPool {
 public:
  explicit HandlerPool(int threads) {
    for (int i = 0; i < threads; ++i) threads_.emplace_back([this] { run(); });
  }
  ~HandlerPool() { stop(); }
  HandlerPool(const HandlerPool&) = delete;
  HandlerPool& operator=(const HandlerPool&) = delete;

  // Queues `task`; false when `max_waiting` tasks already wait (or the pool stopped).
  bool try_post(std::function<void()> task, size_t max_waiting) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (stopped_ || queue_.size() >= max_waiting) return false;
      queue_.push_back(std::move(task));
    }
    changed_.notify_one();
    return true;
  }
  size_t waiting() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return queue_.size();
  }
  // Runs what is queued, then joins the threads.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopped_ = true;
    }
    changed_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    threads_.clear();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        changed_.wait(lock, [&] { return stopped_ || !queue_.empty(); });
        if (queue_.empty()) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();
    }
  }

  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::function<void()>> queue_;
  bool stopped_ = false;
  std::vector<std::thread> threads_;
};

std::string reason_phrase(int status) {
  if (status == 499) return "Client Closed Request";
  const beast::string_view r = http::obsolete_reason(static_cast<http::status>(status));
  return r == "<unknown-status>" ? "Status" : std::string(r);
}

std::string http_date() {
  const time_t now = time(nullptr);
  tm t{};
  gmtime_r(&now, &t);
  char buf[64];
  strftime(buf, sizeof(buf), "%a, %d %b %Y %H:%M:%S GMT", &t);
  return buf;
}

// The status line and headers of a reply (ends with the blank line). body_length < 0: chunked (HTTP/1.1)
// or until close (HTTP/1.0).
std::string reply_head(const HttpReply& reply, int version, bool keep_alive, long long body_length) {
  std::string h;
  h.reserve(256);
  h += version >= 11 ? "HTTP/1.1 " : "HTTP/1.0 ";
  h += std::to_string(reply.status) + " " + reason_phrase(reply.status) + "\r\n";
  h += "Date: " + http_date() + "\r\n";
  h += "Server: arbiter\r\n";
  h += "Content-Type: " + reply.content_type + "\r\n";
  for (const auto& [k, v] : reply.headers) h += k + ": " + v + "\r\n";
  if (body_length >= 0) h += "Content-Length: " + std::to_string(body_length) + "\r\n";
  else if (version >= 11) h += "Transfer-Encoding: chunked\r\n";
  if (keep_alive) {
    if (version < 11) h += "Connection: keep-alive\r\n";
  } else {
    h += "Connection: close\r\n";
  }
  h += "\r\n";
  return h;
}

// An answer of the transport itself (no handler ran).
HttpReply transport_error(int status, const std::string& message, const std::string& code, int retry_after) {
  return error_reply({status, message, status >= 500 ? "server_error" : "invalid_request_error", "", code, retry_after});
}

bool answered_on_event_loop(const HttpRequest& r) {
  return (r.method == "GET" || r.method == "HEAD") &&
         (r.path == "/health" || r.path == "/ready" || r.path == "/metrics" || is_console_path(r.path));
}

// Raises the soft descriptor limit to the hard one (thousands of connections need thousands of
// descriptors); returns the limit in force.
rlim_t raise_descriptor_limit() {
  rlimit l{};
  if (getrlimit(RLIMIT_NOFILE, &l) != 0) return 1024;
  if (l.rlim_cur < l.rlim_max) {
    l.rlim_cur = l.rlim_max;
    setrlimit(RLIMIT_NOFILE, &l);
    getrlimit(RLIMIT_NOFILE, &l);
  }
  return l.rlim_cur;
}

}  // namespace

// The shared state of the transport: options, the event loop, the handler pool, the live
// connections (for stop()), the transport's metrics.
struct HttpTransport::Impl {
  class Connection;

  Impl(HttpTransportOptions o, Handler h, MetricsRegistry& m)
      : options(std::move(o)),
        handler(std::move(h)),
        connections_gauge(m.gauge("arbiter_http_connections", "Open HTTP connections.")),
        waiting_gauge(m.gauge("arbiter_http_waiting_requests", "Complete HTTP requests waiting for a handler thread.")),
        metrics(m) {
    // Every reason's series exists from the start (at 0), so that rate() and alerts see it.
    for (const char* reason : {"connections", "waiting", "too_large", "malformed", "timeout"}) count_rejected(reason, 0);
  }

  void count_rejected(const char* reason, double amount = 1) {
    metrics.counter("arbiter_http_rejected_total",
                    "HTTP requests and connections the transport answered itself, by reason "
                    "(connections, waiting, too_large, malformed, timeout).",
                    {{"reason", reason}})
        .inc(amount);
  }

  void accept();
  void close_all_idle();

  HttpTransportOptions options;
  Handler handler;
  Gauge& connections_gauge;
  Gauge& waiting_gauge;
  MetricsRegistry& metrics;
  std::vector<std::thread> io_threads;
  std::unique_ptr<HandlerPool> pool;
  std::atomic<bool> stopping{false};
  std::atomic<int> open{0};
  int connection_limit = 0;
  std::mutex live_mutex;
  std::condition_variable live_changed;
  std::unordered_map<Connection*, std::weak_ptr<Connection>> live;
  bool started = false;
  // Declared last, so destroyed first: handlers it still holds may own connections, whose
  // destructors use the members above.
  asio::io_context io;
  std::optional<asio::executor_work_guard<asio::io_context::executor_type>> work;
  std::optional<tcp::acceptor> acceptor;
  std::optional<asio::steady_timer> accept_backoff;
};

// One client connection: reads a request (event loop), hands it to a handler thread, writes the
// reply (event loop; streams are written chunk by chunk from the handler thread through the loop),
// then reads the next one. Every step on the socket runs on the connection's strand.
class HttpTransport::Impl::Connection : public std::enable_shared_from_this<Connection> {
 public:
  Connection(Impl* impl, tcp::socket socket) : impl_(impl), socket_(std::move(socket)), timer_(socket_.get_executor()) {
    impl_->open.fetch_add(1);
    impl_->connections_gauge.add(1);
  }
  ~Connection() {
    impl_->open.fetch_sub(1);
    impl_->connections_gauge.add(-1);
    {
      std::lock_guard<std::mutex> lock(impl_->live_mutex);
      impl_->live.erase(this);
    }
    impl_->live_changed.notify_all();
  }

  void start() {
    {
      std::lock_guard<std::mutex> lock(impl_->live_mutex);
      impl_->live.emplace(this, weak_from_this());
    }
    beast::error_code ignored;
    socket_.set_option(tcp::no_delay(true), ignored);
    asio::dispatch(socket_.get_executor(), [self = shared_from_this()] { self->wait_for_request(); });
  }

  // Answers 503 (too many connections) and closes.
  void reject() {
    asio::dispatch(socket_.get_executor(), [self = shared_from_this()] {
      self->keep_alive_ = false;
      self->impl_->count_rejected("connections");
      self->write_reply(transport_error(503, "The server has too many open connections; retry later.", "too_many_connections",
                                    self->impl_->options.retry_after_seconds));
    });
  }

  // On the strand: closes the connection if it is waiting for or reading a request (what it has
  // not finished sending will not be answered); otherwise it closes after its reply.
  void close_if_idle() {
    keep_alive_ = false;
    if (reading_) close();
  }
  asio::any_io_executor executor() { return socket_.get_executor(); }

 private:
  void wait_for_request() {
    if (impl_->stopping.load()) return close();
    reading_ = true;
    if (buffer_.size() > 0) return read_head();
    // Nothing buffered: wait for the first byte (a fresh connection has header_timeout to send one,
    // an idle keep-alive connection idle_timeout).
    arm(seconds(first_ ? impl_->options.header_timeout : impl_->options.idle_timeout));
    socket_.async_read_some(buffer_.prepare(4096), [self = shared_from_this()](beast::error_code ec, size_t n) {
      self->timer_.cancel();
      if (ec) return self->close();  // idle timeout, end of stream or reset: nothing was asked
      self->buffer_.commit(n);
      self->read_head();
    });
  }

  void read_head() {
    first_ = false;
    parser_.emplace();
    parser_->header_limit(kHeaderLimit);
    parser_->body_limit(impl_->options.max_body_bytes);
    arm(seconds(impl_->options.header_timeout));
    http::async_read_header(socket_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->timer_.cancel();
      self->on_head(ec);
    });
  }

  void on_head(beast::error_code ec) {
    if (ec) return read_failed(ec);
    const auto& req = parser_->get();
    version_ = req.version();
    keep_alive_ = req.keep_alive();
    const auto length = parser_->content_length();
    if (length && *length > impl_->options.max_body_bytes) return too_large(*length);
    if (parser_->is_done()) return on_request();
    if (beast::iequals(req[http::field::expect], "100-continue") && version_ >= 11) {
      auto interim = std::make_shared<std::string>("HTTP/1.1 100 Continue\r\n\r\n");
      arm(seconds(impl_->options.write_timeout));
      asio::async_write(socket_, asio::buffer(*interim), [self = shared_from_this(), interim](beast::error_code e, size_t) {
        self->timer_.cancel();
        if (e) return self->close();
        self->read_body();
      });
      return;
    }
    read_body();
  }

  void read_body() {
    arm(seconds(impl_->options.body_timeout));
    http::async_read(socket_, buffer_, *parser_, [self = shared_from_this()](beast::error_code ec, size_t) {
      self->timer_.cancel();
      if (ec) return self->read_failed(ec);
      self->on_request();
    });
  }

  // Starts the deadline of the next socket operation: when it passes, the operation is cancelled
  // (and fails with timed_out_ set).
  void arm(Clock::duration d) {
    timed_out_ = false;
    timer_.expires_after(d);
    timer_.async_wait([self = shared_from_this()](beast::error_code ec) {
      if (ec) return;  // cancelled: the operation finished in time
      self->timed_out_ = true;
      beast::error_code ignored;
      self->socket_.cancel(ignored);
    });
  }

  void read_failed(beast::error_code ec) {
    keep_alive_ = false;
    if (timed_out_) {  // a head or body that did not arrive in time: answered, then closed
      impl_->count_rejected("timeout");
      return write_reply(transport_error(408, "The request did not arrive in time.", "request_timeout", 0));
    }
    if (ec == http::error::body_limit) return too_large(0);
    if (ec == http::error::header_limit) {
      impl_->count_rejected("too_large");
      return write_reply(transport_error(431, "The request head is larger than " + std::to_string(kHeaderLimit) + " bytes.",
                                     "header_too_large", 0));
    }
    if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset ||
        ec == http::error::partial_message)
      return close();  // the client went away mid-request: no one to answer
    impl_->count_rejected("malformed");
    write_reply(transport_error(400, "Malformed HTTP request: " + ec.message() + ".", "malformed_request", 0));
  }

  void too_large(uint64_t length) {
    keep_alive_ = false;
    impl_->count_rejected("too_large");
    std::string message = "The request body is ";
    message += length ? std::to_string(length) + " bytes" : "larger than the limit";
    message += "; the limit is " + std::to_string(impl_->options.max_body_bytes) + ".";
    write_reply(transport_error(413, message, "request_too_large", 0));
  }

  void on_request() {
    reading_ = false;
    auto message = parser_->release();
    parser_.reset();
    HttpRequest request;
    request.method = std::string(message.method_string());
    const std::string_view target(message.target().data(), message.target().size());
    const std::string_view path = target.substr(0, target.find('?'));
    request.path = percent_decode(path, false).value_or(std::string(path));  // malformed escapes kept as sent
    if (const size_t q = target.find('?'); q != std::string_view::npos) request.query = std::string(target.substr(q + 1));
    for (const auto& field : message) {
      std::string name(field.name_string());
      std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
      request.headers.emplace(std::move(name), std::string(field.value()));
    }
    request.body = std::move(message.body());
    head_only_ = request.method == "HEAD";

    if (answered_on_event_loop(request)) return write_reply(impl_->handler(request));

    auto task = [self = shared_from_this(), request = std::move(request)]() mutable { self->handle(std::move(request)); };
    if (!impl_->pool->try_post(std::move(task), static_cast<size_t>(impl_->options.max_waiting))) {
      impl_->count_rejected("waiting");
      return write_reply(transport_error(429, "Too many requests are waiting for the server; retry later.", "queue_full",
                                     impl_->options.retry_after_seconds));
    }
    impl_->waiting_gauge.set(static_cast<double>(impl_->pool->waiting()));
  }

  // On a handler thread.
  void handle(HttpRequest request) {
    impl_->waiting_gauge.set(static_cast<double>(impl_->pool->waiting()));
    auto watch = std::make_shared<ConnectionWatch>(socket_.native_handle(), version_ >= 11);
    request.client_gone = [watch] { return watch->closed(); };
    HttpReply reply;
    try {
      reply = impl_->handler(request);
    } catch (const std::exception& e) {
      reply = transport_error(500, std::string("Internal error: ") + e.what(), "internal_error", 0);
    }
    watch->mark_replying();
    if (reply.stream) return write_stream(std::move(reply), *watch);
    asio::post(socket_.get_executor(), [self = shared_from_this(), reply = std::move(reply)]() mutable {
      self->write_reply(std::move(reply));
    });
  }

  // On the strand: writes a whole reply in one write, then reads the next request or closes.
  void write_reply(HttpReply reply) {
    if (impl_->stopping.load()) keep_alive_ = false;
    auto out = std::make_shared<std::string>(reply_head(reply, version_, keep_alive_, static_cast<long long>(reply.body.size())));
    if (!head_only_) *out += reply.body;
    arm(seconds(impl_->options.write_timeout));
    asio::async_write(socket_, asio::buffer(*out), [self = shared_from_this(), out](beast::error_code ec, size_t) {
      self->timer_.cancel();
      if (ec) return self->close();
      self->after_reply();
    });
  }

  void after_reply() {
    if (keep_alive_ && !impl_->stopping.load()) return wait_for_request();
    shutdown_and_close();
  }

  // On a handler thread: a streamed reply. Its head, each chunk and the end are written through the
  // strand while this thread waits (at most write_timeout each).
  void write_stream(HttpReply reply, ConnectionWatch& watch) {
    const bool chunked = version_ >= 11;
    if (!chunked) keep_alive_ = false;  // HTTP/1.0: the body ends when the connection does
    bool ok = write_blocking(reply_head(reply, version_, keep_alive_, -1));
    auto frame = [chunked](std::string_view chunk) {
      std::string framed;
      if (chunked) {
        char size[32];
        std::snprintf(size, sizeof(size), "%zx\r\n", chunk.size());
        framed = size;
      }
      framed.append(chunk);
      if (chunked) framed += "\r\n";
      return framed;
    };
    if (ok && !head_only_) {
      if (!reply.stream_probe.empty())
        watch.set_body_probe([&] { return ok = ok && write_blocking(frame(reply.stream_probe)); });
      reply.stream([&](std::string_view chunk) {
        if (!ok) return false;
        if (chunk.empty()) return true;
        ok = write_blocking(frame(chunk));
        return ok;
      });
      watch.set_body_probe(nullptr);
      if (ok && chunked) ok = write_blocking("0\r\n\r\n");
    }
    asio::post(socket_.get_executor(), [self = shared_from_this(), ok] {
      if (!ok) return self->close();
      self->after_reply();
    });
  }

  bool write_blocking(std::string data) {
    auto done = std::make_shared<std::promise<bool>>();
    auto result = done->get_future();
    auto out = std::make_shared<std::string>(std::move(data));
    asio::post(socket_.get_executor(), [self = shared_from_this(), out, done] {
      self->arm(seconds(self->impl_->options.write_timeout));
      asio::async_write(self->socket_, asio::buffer(*out), [self, out, done](beast::error_code ec, size_t) {
        self->timer_.cancel();
        done->set_value(!ec);
      });
    });
    // The loop answers within write_timeout; the margin covers a loop that is being stopped.
    if (result.wait_for(seconds(impl_->options.write_timeout + 5)) != std::future_status::ready) return false;
    try {
      return result.get();
    } catch (const std::future_error&) {  // the loop stopped before it ran the write
      return false;
    }
  }

  // Sends FIN, then reads (and drops) what the client still sends for a moment before closing, so
  // the reply is not destroyed by a reset when unread request bytes remain (e.g. a refused body).
  void shutdown_and_close() {
    beast::error_code ignored;
    socket_.shutdown(tcp::socket::shutdown_send, ignored);
    arm(kLingerOnClose);
    drain_before_close();
  }
  void drain_before_close() {
    socket_.async_read_some(asio::buffer(drain_), [self = shared_from_this()](beast::error_code ec, size_t) {
      if (ec) return self->close();  // end of stream, or the linger deadline cancelled the read
      self->drain_before_close();
    });
  }

  void close() {
    beast::error_code ignored;
    timer_.cancel();
    socket_.shutdown(tcp::socket::shutdown_both, ignored);
    socket_.close(ignored);
  }

  Impl* impl_;
  tcp::socket socket_;
  asio::steady_timer timer_;  // the deadline of the operation in progress
  bool timed_out_ = false;    // the deadline cancelled it
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  unsigned version_ = 11;
  std::atomic<bool> keep_alive_{true};  // cleared by stop() while a handler thread may read it
  bool head_only_ = false;
  bool first_ = true;
  bool reading_ = false;  // waiting for or reading a request (not handling or answering one)
  char drain_[4096];
};

void HttpTransport::Impl::accept() {
  acceptor->async_accept(asio::make_strand(io), [self = this](beast::error_code ec, tcp::socket socket) {
    if (self->stopping.load()) return;
    if (ec) {
      // Out of descriptors (or another transient failure): try again shortly rather than spin.
      self->accept_backoff->expires_after(kAcceptBackoff);
      self->accept_backoff->async_wait([self](beast::error_code) {
        if (!self->stopping.load()) self->accept();
      });
      return;
    }
    auto connection = std::make_shared<Connection>(self, std::move(socket));
    if (self->open.load() > self->connection_limit) connection->reject();
    else connection->start();
    self->accept();
  });
}

void HttpTransport::Impl::close_all_idle() {
  std::vector<std::shared_ptr<Connection>> connections;
  {
    std::lock_guard<std::mutex> lock(live_mutex);
    for (auto& [raw, weak] : live)
      if (auto c = weak.lock()) connections.push_back(std::move(c));
  }
  for (auto& c : connections) asio::dispatch(c->executor(), [c] { c->close_if_idle(); });
}

HttpTransport::HttpTransport(HttpTransportOptions options, Handler handler, MetricsRegistry& metrics)
    : impl_(std::make_unique<Impl>(std::move(options), std::move(handler), metrics)) {}

HttpTransport::~HttpTransport() { stop(); }

int HttpTransport::bind() {
  Impl& impl = *impl_;
  const rlim_t descriptors = raise_descriptor_limit();
  // Keep descriptors for the model, the database, logs and the like.
  const long long usable = static_cast<long long>(descriptors) - 64;
  impl.connection_limit = static_cast<int>(std::max(1LL, std::min<long long>(impl.options.max_connections, usable)));
  beast::error_code ec;
  const auto address = asio::ip::make_address(impl.options.host, ec);
  tcp::endpoint endpoint;
  if (ec) {
    tcp::resolver resolver(impl.io);
    const auto results = resolver.resolve(impl.options.host, std::to_string(impl.options.port), ec);
    if (ec || results.empty()) throw std::runtime_error("cannot resolve " + impl.options.host + ": " + ec.message());
    endpoint = *results.begin();
  } else {
    endpoint = tcp::endpoint(address, static_cast<unsigned short>(impl.options.port));
  }
  impl.acceptor.emplace(impl.io);
  impl.acceptor->open(endpoint.protocol(), ec);
  if (!ec) impl.acceptor->set_option(asio::socket_base::reuse_address(true), ec);
  if (!ec) impl.acceptor->bind(endpoint, ec);
  if (!ec) impl.acceptor->listen(asio::socket_base::max_listen_connections, ec);
  if (ec)
    throw std::runtime_error("cannot listen on " + impl.options.host + ":" + std::to_string(impl.options.port) + ": " + ec.message());
  impl.accept_backoff.emplace(impl.io);
  return impl.acceptor->local_endpoint().port();
}

void HttpTransport::start() {
  Impl& impl = *impl_;
  if (!impl.acceptor) throw std::logic_error("HttpTransport::start before bind");
  if (impl.started) return;
  impl.started = true;
  impl.pool = std::make_unique<HandlerPool>(std::max(1, impl.options.handler_threads));
  impl.work.emplace(impl.io.get_executor());
  impl.accept();
  for (int i = 0; i < std::max(1, impl.options.io_threads); ++i) impl.io_threads.emplace_back([&impl] { impl.io.run(); });
}

void HttpTransport::stop() {
  Impl& impl = *impl_;
  if (!impl.started || impl.stopping.exchange(true)) return;
  asio::post(impl.io, [&impl] {
    beast::error_code ignored;
    impl.acceptor->close(ignored);
    impl.accept_backoff->cancel();
  });
  impl.close_all_idle();
  // Connections finish the reply they are writing (each write is bounded by write_timeout) and close.
  {
    std::unique_lock<std::mutex> lock(impl.live_mutex);
    impl.live_changed.wait_for(lock, seconds(impl.options.write_timeout + kLingerOnClose.count()),
                               [&] { return impl.live.empty(); });
  }
  impl.pool->stop();
  impl.work.reset();
  impl.io.stop();
  for (auto& t : impl.io_threads) t.join();
  impl.io_threads.clear();
}

}  // namespace arbiter::api
