package avatarforcing

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// MaxMessageSize is the default limit on one gRPC message in either direction: raw RGB frames
// and reference images can exceed gRPC's default of 4 MiB.
const MaxMessageSize = 64 << 20

// Option configures Dial.
type Option func(*dialConfig)

type dialConfig struct {
	creds    credentials.TransportCredentials
	md       metadata.MD
	dialOpts []grpc.DialOption
	block    bool
	router   Router
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
// it names, following a FAILED_PRECONDITION redirect to the owner; this package does not resume
// a session on another replica when its stream fails (the Python SDK does). A Router set with
// WithRouter replaces placement: is asked for the connection that carries each new session (the
// Client's own connection is passed in as the default); unary RPCs always use the Client's own
// connection. The Router owns the connections it returns: Client.Close does not close them.
type Router interface {
	// Route returns the connection a new session with opts (already validated) should use.
	Route(ctx context.Context, opts SessionOptions, def grpc.ClientConnInterface) (grpc.ClientConnInterface, error)
}

// Client is a connection to an AvatarForcing server. It is safe for concurrent use; one Client
// can run many sessions at once. Close it when done.
type Client struct {
	conn   *grpc.ClientConn
	stub   pb.AvatarForcingClient
	router Router
	target string
	dopts  []grpc.DialOption

	mu       sync.Mutex
	replicas map[string]*grpc.ClientConn // connections to the replicas placement sent sessions to
	noRoute  atomic.Bool                 // the server has no CreateSession (an older server)
}

// Dial creates a Client for target ("host:port" or any gRPC target string). It does not wait
// for the connection unless WithBlock is given; ctx only bounds that wait.
func Dial(ctx context.Context, target string, opts ...Option) (*Client, error) {
	var cfg dialConfig
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
		dopts: dopts, replicas: map[string]*grpc.ClientConn{}}
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

// place asks the server the Client is connected to where a new session runs (CreateSession,
// see docs/routing.md). ok is false for a server without routing: the session then streams
// over the Client's own connection. A refusal (every replica full: RESOURCE_EXHAUSTED) is a
// *StartError, whose trailer holds the retry hint.
func (c *Client) place(ctx context.Context) (resp *pb.CreateSessionResponse, ok bool, err error) {
	if c.noRoute.Load() {
		return nil, false, nil
	}
	var tr metadata.MD
	resp, err = c.stub.CreateSession(ctx, &pb.CreateSessionRequest{}, grpc.Trailer(&tr))
	if status.Code(err) == codes.Unimplemented {
		c.noRoute.Store(true)
		return nil, false, nil
	}
	if err != nil {
		if _, isStatus := status.FromError(err); isStatus {
			return nil, false, &StartError{Err: err, Trailer: tr}
		}
		return nil, false, err
	}
	return resp, true, nil
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
// anchor. name is an optional display name. Avatars live on the replica that registered them.
func (c *Client) RegisterAvatar(ctx context.Context, image []byte, name string) (string, error) {
	if len(image) == 0 {
		return "", invalid("RegisterAvatar: image is empty; pass the PNG or JPEG bytes of the face")
	}
	resp, err := c.stub.RegisterAvatar(ctx, &pb.RegisterAvatarRequest{Image: image, Name: name})
	if err != nil {
		return "", err
	}
	return resp.GetAvatarId(), nil
}
