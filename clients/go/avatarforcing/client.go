package avatarforcing

import (
	"context"
	"crypto/tls"
	"fmt"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
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

// Router is the extension point for session routing across replicas. The server now has a
// routing RPC (CreateSession, see docs/routing.md) and the Python SDK uses it and resumes
// sessions on another replica; this package does not implement that yet. Without routing, a
// session streams on the replica its connection reaches (a Stream without session_id is placed
// there, or refused with RESOURCE_EXHAUSTED when it is full). A Router set with WithRouter is asked for the connection that carries each new session (the
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
	c := &Client{conn: conn, stub: pb.NewAvatarForcingClient(conn), router: cfg.router}
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

// Close closes the connection; sessions still running on it fail with codes.Canceled.
func (c *Client) Close() error { return c.conn.Close() }

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
