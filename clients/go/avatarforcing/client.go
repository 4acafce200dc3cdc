package avatarforcing

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// MaxMessageSize is the default limit on one gRPC message in either direction: raw RGB frames
// and reference images can exceed gRPC's default of 4 MiB.
const MaxMessageSize = 64 << 20

// Option configures Dial.
type Option func(*dialConfig)

type dialConfig struct {
	creds     credentials.TransportCredentials
	md        metadata.MD
	dialOpts  []grpc.DialOption
	block     bool
	router    Router
	keepalive keepalive.ClientParameters
	fallbacks []string
	timeouts  timeouts
}

// Defaults of the Client's time limits (see the With... options).
const (
	DefaultPlacementTimeout = 10 * time.Second
	DefaultAttachTimeout    = 3 * time.Second
	DefaultResumeTimeout    = 15 * time.Second
	DefaultStallTimeout     = time.Second
	DefaultResumeBuffer     = 10 * time.Second
)

// DefaultKeepalive is the gRPC keepalive of the connections a Client dials: an HTTP/2 ping
// after 10 s without traffic, the connection declared dead when the ping is not answered within
// 5 s, pings also while no call is open. The server accepts pings every 5 s or more.
var DefaultKeepalive = keepalive.ClientParameters{Time: 10 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}

// timeouts are a Client's time limits for placement, attaching and resuming.
type timeouts struct {
	placement, attach, resume, stall, resumeBuffer time.Duration
}

// WithKeepalive sets the gRPC keepalive parameters of every connection the Client dials (its
// own and those to the replicas sessions are placed on); the default is DefaultKeepalive. A
// zero p.Time turns keepalive pings off. gRPC raises a Time under 10 s to 10 s.
func WithKeepalive(p keepalive.ClientParameters) Option {
	return func(d *dialConfig) { d.keepalive = p }
}

// WithFallbackTargets names other addresses of the same deployment (replicas, or other load
// balancers). Placement and resume (CreateSession) try them in turn when the target given to
// Dial does not answer (UNAVAILABLE, or no answer within the attach timeout), so that a session
// survives the loss of the replica the Client was dialled to. The replicas sessions were placed
// on are tried as well, without being named here. Unary RPCs (ServerInfo, RegisterAvatar) use
// the Dial target only.
func WithFallbackTargets(addrs ...string) Option {
	return func(d *dialConfig) { d.fallbacks = append(d.fallbacks, addrs...) }
}

// WithPlacementTimeout bounds how long StartSession tries to place and open a session
// (CreateSession, then a Stream until SessionStarted), retrying while replicas are full,
// unreachable, draining or do not answer (default DefaultPlacementTimeout, 10 s; d <= 0: the
// default). The context given to StartSession can only shorten it.
func WithPlacementTimeout(d time.Duration) Option {
	return func(c *dialConfig) { c.timeouts.placement = d }
}

// WithAttachTimeout bounds one attempt: one CreateSession call, or opening a Stream until its
// SessionStarted (default DefaultAttachTimeout, 3 s; d <= 0: the default). An attempt that
// times out is cancelled and placement is asked again, so that a frozen replica (one that
// accepts connections but never answers) cannot hold a session's start; each stream attempt
// that timed out doubles the next one's limit, and every attempt is bounded by what is left of
// the placement or resume time.
func WithAttachTimeout(d time.Duration) Option {
	return func(c *dialConfig) { c.timeouts.attach = d }
}

// WithResumeTimeout sets how long a session whose stream broke keeps trying to resume on
// another replica (default DefaultResumeTimeout, 15 s); 0 (or less) turns resuming off.
// SessionOptions.ResumeTimeout overrides it per session.
func WithResumeTimeout(d time.Duration) Option {
	return func(c *dialConfig) { c.timeouts.resume = max(d, -1) }
}

// WithStallTimeout sets the frame-stall watchdog of PACING_REALTIME sessions: a started
// session whose stream delivers nothing for this long while the Client waits on it is treated
// as broken and resumed (default DefaultStallTimeout, 1 s); 0 (or less) turns it off.
// SessionOptions.StallTimeout overrides it per session. PACING_ASAP sessions have no watchdog
// (the server may legitimately pause them).
func WithStallTimeout(d time.Duration) Option {
	return func(c *dialConfig) { c.timeouts.stall = max(d, -1) }
}

// WithResumeBuffer sets how much of the audio sent, and not yet covered by frames received,
// a session keeps to send again when it resumes (default DefaultResumeBuffer, 10 s of audio;
// d <= 0: the default). Audio older than that is not sent again. SessionOptions.ResumeBuffer
// overrides it per session.
func WithResumeBuffer(d time.Duration) Option {
	return func(c *dialConfig) { c.timeouts.resumeBuffer = max(d, -1) }
}

// fill replaces unset time limits by the defaults: zero means unset (for resume and stall, a
// negative value set by an option means off).
func (t timeouts) fill() timeouts {
	if t.placement <= 0 {
		t.placement = DefaultPlacementTimeout
	}
	if t.attach <= 0 {
		t.attach = DefaultAttachTimeout
	}
	if t.resumeBuffer <= 0 {
		t.resumeBuffer = DefaultResumeBuffer
	}
	return t
}

// WithTransportCredentials sets the connection's transport credentials (for example
// credentials.NewTLS). Without this option, or WithTLS, the connection is plaintext.
func WithTransportCredentials(c credentials.TransportCredentials) Option {
	return func(d *dialConfig) { d.creds = c }
}

// WithTLS connects over TLS with cfg (nil: the system roots and the target's host name).
func WithTLS(cfg *tls.Config) Option {
	if cfg == nil {
		cfg = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return WithTransportCredentials(credentials.NewTLS(cfg))
}

// WithMetadata adds key/value pairs (alternating, as in metadata.Pairs) sent with every RPC,
// unary and streaming, for example an API key. It panics on an odd number of arguments.
func WithMetadata(kv ...string) Option {
	md := metadata.Pairs(kv...)
	return func(d *dialConfig) { d.md = metadata.Join(d.md, md) }
}

// WithBearerToken sends "authorization: Bearer <token>" with every RPC. Pair it with WithTLS:
// over a plaintext connection the token travels in clear.
func WithBearerToken(token string) Option {
	return WithMetadata("authorization", "Bearer "+token)
}

// WithDialOptions appends raw gRPC dial options (keepalive, interceptors, a custom resolver,
// per-RPC credentials, ...). They are applied after this package's own defaults, so they can
// override them.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(d *dialConfig) { d.dialOpts = append(d.dialOpts, opts...) }
}

// WithBlock makes Dial wait until the connection is ready (or its context ends, or the
// connection fails to come up). By default Dial returns at once and connects in the background.
func WithBlock() Option {
	return func(d *dialConfig) { d.block = true }
}

// WithRouter sets the Router that picks the connection of each new session; see [Router].
func WithRouter(r Router) Option {
	return func(d *dialConfig) { d.router = r }
}

// Router is an extension point for custom session routing. By default (no Router) StartSession
// asks the server for placement (CreateSession, see docs/routing.md) and streams on the replica
// it names, following a FAILED_PRECONDITION redirect to the owner, and a session whose stream
// breaks resumes on another replica. A Router set with WithRouter replaces placement: it is asked
// for the connection that carries each new session (the Client's own connection is passed in as
// the default), the session is opened there in one attempt (bounded by the placement timeout)
// and is not resumed when its stream breaks; unary RPCs always use the Client's own connection.
// The Router owns the connections it returns: Client.Close does not close them.
type Router interface {
	// Route returns the connection a new session with opts (already validated) should use.
	Route(ctx context.Context, opts SessionOptions, def grpc.ClientConnInterface) (grpc.ClientConnInterface, error)
}

// Client is a connection to an AvatarForcing server. It is safe for concurrent use; one Client
// can run many sessions at once. Close it when done.
type Client struct {
	conn      *grpc.ClientConn
	stub      pb.AvatarForcingClient
	router    Router
	target    string
	fallbacks []string
	dopts     []grpc.DialOption
	timeouts  timeouts
	avatars   *avatarCache

	mu       sync.Mutex
	replicas map[string]*grpc.ClientConn // connections to the replicas placement sent sessions to
	front    string                      // the address that answered CreateSession last
	noRoute  atomic.Bool                 // the server has no CreateSession (an older server)
}

// Dial creates a Client for target ("host:port" or any gRPC target string). It does not wait
// for the connection unless WithBlock is given; ctx only bounds that wait.
func Dial(ctx context.Context, target string, opts ...Option) (*Client, error) {
	cfg := dialConfig{
		keepalive: DefaultKeepalive,
		timeouts:  timeouts{resume: DefaultResumeTimeout, stall: DefaultStallTimeout},
	}
	for _, o := range opts {
		o(&cfg)
	}
	creds := cfg.creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	dopts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(MaxMessageSize), grpc.MaxCallSendMsgSize(MaxMessageSize)),
	}
	if cfg.keepalive.Time > 0 {
		dopts = append(dopts, grpc.WithKeepaliveParams(cfg.keepalive))
	}
	if len(cfg.md) > 0 {
		md := cfg.md
		dopts = append(dopts,
			grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any,
				cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
				return invoker(withMD(ctx, md), method, req, reply, cc, opts...)
			}),
			grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
				method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
				return streamer(withMD(ctx, md), desc, cc, method, opts...)
			}))
	}
	dopts = append(dopts, cfg.dialOpts...)
	conn, err := grpc.NewClient(target, dopts...)
	if err != nil {
		return nil, fmt.Errorf("avatarforcing: dial %s: %w", target, err)
	}
	c := &Client{conn: conn, stub: pb.NewAvatarForcingClient(conn), router: cfg.router, target: target,
		fallbacks: slices.Clone(cfg.fallbacks), dopts: dopts, timeouts: cfg.timeouts.fill(),
		avatars: newAvatarCache(avatarCacheSize), replicas: map[string]*grpc.ClientConn{}}
	if cfg.block {
		if err := c.waitReady(ctx); err != nil {
			conn.Close()
			return nil, fmt.Errorf("avatarforcing: dial %s: %w", target, err)
		}
	}
	return c, nil
}

func withMD(ctx context.Context, md metadata.MD) context.Context {
	out, _ := metadata.FromOutgoingContext(ctx)
	return metadata.NewOutgoingContext(ctx, metadata.Join(md, out))
}

func (c *Client) waitReady(ctx context.Context) error {
	c.conn.Connect()
	for {
		s := c.conn.GetState()
		switch s {
		case connectivity.Ready:
			return nil
		case connectivity.Shutdown:
			return fmt.Errorf("connection shut down")
		}
		if !c.conn.WaitForStateChange(ctx, s) {
			return fmt.Errorf("connection not ready (%s): %w", s, ctx.Err())
		}
	}
}

// Conn returns the underlying gRPC connection, for example to call the health service.
func (c *Client) Conn() *grpc.ClientConn { return c.conn }

// Close closes the connection (and those to the replicas sessions were placed on); sessions
// still running on them fail with codes.Canceled.
func (c *Client) Close() error {
	c.mu.Lock()
	errs := []error{c.conn.Close()}
	for addr, cc := range c.replicas {
		errs = append(errs, cc.Close())
		delete(c.replicas, addr)
	}
	c.mu.Unlock()
	return errors.Join(errs...)
}

// createSession asks for placement (CreateSession, see docs/routing.md): a new session when
// req names none, else where the session req names resumes. It tries the Client's targets in
// turn (the one that answered last first, avoid last) while one is unreachable (UNAVAILABLE) or
// does not answer within perCall; any other answer is final. noRoute is true when the server
// has no CreateSession (an older server: sessions stream over the Client's own connection).
// A refusal is a *StartError, whose trailer holds the retry hint.
func (c *Client) createSession(ctx context.Context, req *pb.CreateSessionRequest, perCall time.Duration,
	avoid string) (resp *pb.CreateSessionResponse, noRoute bool, err error) {
	for _, addr := range c.placementTargets(avoid) {
		cc, derr := c.connFor(addr)
		if derr != nil {
			err = derr
			continue
		}
		var tr metadata.MD
		cctx, cancel := context.WithTimeout(ctx, perCall)
		resp, err = pb.NewAvatarForcingClient(cc).CreateSession(cctx, req, grpc.Trailer(&tr))
		cancel()
		if err == nil {
			c.mu.Lock()
			c.front = addr
			c.mu.Unlock()
			return resp, false, nil
		}
		if status.Code(err) == codes.Unimplemented && req.GetResumeSessionId() == "" {
			c.noRoute.Store(true)
			return nil, true, nil
		}
		if _, isStatus := status.FromError(err); isStatus {
			err = &StartError{Err: err, Trailer: tr}
		}
		if code := status.Code(err); (code != codes.Unavailable && code != codes.DeadlineExceeded) || ctx.Err() != nil {
			return nil, false, err
		}
	}
	return nil, false, err
}

// placementTargets lists the addresses CreateSession may go to: the Dial target, the fallback
// targets and the replicas sessions were placed on, the one that answered last first and avoid
// (a replica that just failed a session) last.
func (c *Client) placementTargets(avoid string) []string {
	c.mu.Lock()
	replicas := make([]string, 0, len(c.replicas))
	for addr := range c.replicas {
		replicas = append(replicas, addr)
	}
	front := c.front
	c.mu.Unlock()
	slices.Sort(replicas)
	all := append(append([]string{c.target}, c.fallbacks...), replicas...)
	out := make([]string, 0, len(all))
	seen := map[string]bool{}
	add := func(a string) {
		if a != "" && a != avoid && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	if front != "" && slices.Contains(all, front) {
		add(front)
	}
	for _, a := range all {
		add(a)
	}
	if avoid != "" && slices.Contains(all, avoid) {
		out = append(out, avoid)
	}
	return out
}

// connFor returns a connection to the replica at addr (the Client's own for its own target),
// dialled once with the Client's options (credentials, metadata) and kept until Close.
func (c *Client) connFor(addr string) (grpc.ClientConnInterface, error) {
	if addr == "" || addr == c.target {
		return c.conn, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if cc, ok := c.replicas[addr]; ok {
		return cc, nil
	}
	cc, err := grpc.NewClient(addr, c.dopts...)
	if err != nil {
		return nil, fmt.Errorf("avatarforcing: dial replica %s: %w", addr, err)
	}
	c.replicas[addr] = cc
	return cc, nil
}

// ServerInfo returns the server's model and stream configuration, capacity and free slots.
func (c *Client) ServerInfo(ctx context.Context) (*pb.ServerInfo, error) {
	return c.stub.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
}

// RegisterAvatar uploads a reference face (PNG or JPEG bytes) once and returns its avatar id,
// for SessionOptions.AvatarID: sessions that name it skip the upload and reuse its style
// anchor. name is an optional display name. The id is derived from the image and the caller's
// tenant, so registering the same image again returns the same id.
//
// The Client keeps the image of the last 64 avatars it registered (by id): when a session that
// names one reaches a replica that does not know it (its Stream fails NOT_FOUND naming the
// avatar, for example after a replica restarted, or on resume elsewhere), the session registers
// the image there again and retries once.
func (c *Client) RegisterAvatar(ctx context.Context, image []byte, name string) (string, error) {
	if len(image) == 0 {
		return "", invalid("RegisterAvatar: image is empty; pass the PNG or JPEG bytes of the face")
	}
	resp, err := c.stub.RegisterAvatar(ctx, &pb.RegisterAvatarRequest{Image: image, Name: name})
	if err != nil {
		return "", err
	}
	c.avatars.put(resp.GetAvatarId(), image, name)
	return resp.GetAvatarId(), nil
}
