package avatarforcing_test

// A fake fleet of replicas with routing (CreateSession, session ownership, resume) on real
// loopback listeners, for the tests of placement, resume, the stall watchdog and avatar
// re-registration. Each replica renders like the server does, in miniature: blocks of 4 frames
// at 25 fps, each block consuming 4/25 s of the client's audio, an AudioOut per block (with
// source_end_sample) followed by its frames; PACING_ASAP renders when a block of audio is there
// (or EndOfAudio came), PACING_REALTIME renders a block every tick whatever the audio.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

const (
	fleetFPB  = 4
	fleetTick = 10 * time.Millisecond // a REALTIME block every tick (16x real time)
)

type fleet struct {
	mu       sync.Mutex
	replicas []*replica
	sessions map[string]*fleetSession
	newCalls int

	// placeAddr picks the address of the n-th new placement (0, 1, ...); default: replica 0.
	placeAddr func(n int) string
	// refuseNew answers the first refuseNew new placements RESOURCE_EXHAUSTED (retry-after-ms 200).
	refuseNew int
	// forgetOnResume answers every resume NOT_FOUND.
	forgetOnResume bool
	// renderAfterEOA makes PACING_ASAP streams wait for EndOfAudio before rendering anything.
	renderAfterEOA bool
	// createCalls logs every CreateSession: "<replica>:new" or "<replica>:resume".
	createCalls []string
}

type fleetSession struct {
	id, token string
	owner     *replica
}

type replica struct {
	pb.UnimplementedAvatarForcingServer
	f          *fleet
	name, addr string
	gs         *grpc.Server

	// guarded by f.mu
	avatars    map[string]bool
	registered [][]byte     // images registered here
	streams    []*streamRec // every stream that reached SessionStarted here
	// One-shot faults, taken by the next stream that starts here: after this many frames the
	// stream fails UNAVAILABLE / stops sending / ends with END_REASON_SERVER_SHUTDOWN.
	failAfterFrames, stallAfterFrames, shutdownAfterFrames int
}

type streamRec struct {
	replica     string
	resumeBlock uint64

	mu    sync.Mutex
	audio []byte // every audio byte the stream received
	eoa   bool
}

func (r *streamRec) snapshot() ([]byte, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]byte(nil), r.audio...), r.eoa
}

// startFleet starts n replicas named A, B, ... on loopback ports.
func startFleet(t *testing.T, n int) *fleet {
	t.Helper()
	f := &fleet{sessions: map[string]*fleetSession{}}
	for i := 0; i < n; i++ {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		r := &replica{f: f, name: string(rune('A' + i)), addr: lis.Addr().String(), gs: grpc.NewServer(),
			avatars: map[string]bool{}}
		pb.RegisterAvatarForcingServer(r.gs, r)
		go r.gs.Serve(lis)
		t.Cleanup(r.gs.Stop)
		f.replicas = append(f.replicas, r)
	}
	return f
}

func (f *fleet) byAddr(addr string) *replica {
	for _, r := range f.replicas {
		if r.addr == addr {
			return r
		}
	}
	return nil
}

func (f *fleet) calls() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.createCalls...)
}

func (f *fleet) streamsOf(r *replica) []*streamRec {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]*streamRec(nil), r.streams...)
}

func (r *replica) RegisterAvatar(_ context.Context, req *pb.RegisterAvatarRequest) (*pb.RegisterAvatarResponse, error) {
	sum := sha256.Sum256(req.GetImage())
	id := "av_" + hex.EncodeToString(sum[:6]) // content-derived, as the server's
	r.f.mu.Lock()
	defer r.f.mu.Unlock()
	r.avatars[id] = true
	r.registered = append(r.registered, req.GetImage())
	return &pb.RegisterAvatarResponse{AvatarId: id}, nil
}

func (r *replica) CreateSession(ctx context.Context, req *pb.CreateSessionRequest) (*pb.CreateSessionResponse, error) {
	f := r.f
	f.mu.Lock()
	defer f.mu.Unlock()
	if id := req.GetResumeSessionId(); id != "" {
		f.createCalls = append(f.createCalls, r.name+":resume")
		sess := f.sessions[id]
		if sess == nil || f.forgetOnResume {
			return nil, status.Errorf(codes.NotFound, "unknown or expired session %s", id)
		}
		if sess.token != req.GetSessionToken() {
			return nil, status.Error(codes.PermissionDenied, "wrong session token")
		}
		// The owner's stream broke: move the session to another replica.
		for _, o := range f.replicas {
			if o != sess.owner {
				sess.owner = o
				break
			}
		}
		return &pb.CreateSessionResponse{SessionId: id, SessionToken: sess.token, Address: sess.owner.addr,
			NodeId: sess.owner.name, Resumed: true}, nil
	}
	f.createCalls = append(f.createCalls, r.name+":new")
	n := f.newCalls
	f.newCalls++
	if n < f.refuseNew {
		grpc.SetTrailer(ctx, metadata.Pairs("retry-after-ms", "200"))
		return nil, status.Error(codes.ResourceExhausted, "every replica is full")
	}
	addr := f.replicas[0].addr
	if f.placeAddr != nil {
		addr = f.placeAddr(n)
	}
	sess := &fleetSession{id: fmt.Sprintf("s%d", n), token: fmt.Sprintf("tok%d", n), owner: f.byAddr(addr)}
	f.sessions[sess.id] = sess
	return &pb.CreateSessionResponse{SessionId: sess.id, SessionToken: sess.token, Address: addr}, nil
}

func (r *replica) Stream(st grpc.BidiStreamingServer[pb.StreamRequest, pb.StreamResponse]) error {
	first, err := st.Recv()
	if err != nil {
		return err
	}
	cfg := first.GetConfig()
	f := r.f
	f.mu.Lock()
	sess := f.sessions[cfg.GetSessionId()]
	switch {
	case sess == nil:
		f.mu.Unlock()
		return status.Errorf(codes.NotFound, "unknown session %q", cfg.GetSessionId())
	case sess.token != cfg.GetSessionToken():
		f.mu.Unlock()
		return status.Error(codes.PermissionDenied, "wrong session token")
	case sess.owner != r:
		f.mu.Unlock()
		st.SetTrailer(metadata.Pairs("avatarforcing-owner-address", sess.owner.addr))
		return status.Error(codes.FailedPrecondition, "the session is owned by another replica")
	case cfg.GetAvatarId() != "" && !r.avatars[cfg.GetAvatarId()]:
		f.mu.Unlock()
		return status.Errorf(codes.NotFound, "unknown avatar_id %q; register the avatar first", cfg.GetAvatarId())
	}
	rec := &streamRec{replica: r.name, resumeBlock: cfg.GetResumeBlock()}
	r.streams = append(r.streams, rec)
	failAfter, stallAfter, shutdownAfter := r.failAfterFrames, r.stallAfterFrames, r.shutdownAfterFrames
	r.failAfterFrames, r.stallAfterFrames, r.shutdownAfterFrames = 0, 0, 0
	waitEOA := f.renderAfterEOA
	f.mu.Unlock()

	rate := int(cfg.GetAudioFormat().GetSampleRateHz())
	spb := rate / 25 * fleetFPB // samples per block
	block := cfg.GetResumeBlock()
	if err := st.Send(&pb.StreamResponse{Message: &pb.StreamResponse_Started{Started: &pb.SessionStarted{
		SessionId: sess.id, SessionToken: sess.token, Fps: 25, FramesPerBlock: fleetFPB, AudioSampleRateHz: uint32(rate),
		NodeId: r.name, FirstFrameIndex: block * fleetFPB, AvatarId: cfg.GetAvatarId(), IdleTimeoutMs: 60000}}}); err != nil {
		return err
	}
	ctx := st.Context()
	arrived := make(chan struct{}, 1)
	readErr := make(chan error, 1)
	go func() {
		for {
			req, err := st.Recv()
			if err != nil {
				readErr <- err
				close(arrived)
				return
			}
			rec.mu.Lock()
			switch m := req.GetMessage().(type) {
			case *pb.StreamRequest_Audio:
				rec.audio = append(rec.audio, m.Audio.GetData()...)
			case *pb.StreamRequest_EndOfAudio:
				rec.eoa = true
			}
			rec.mu.Unlock()
			select {
			case arrived <- struct{}{}:
			default:
			}
		}
	}()
	realtime := cfg.GetPacing() != pb.Pacing_PACING_ASAP
	consumed, frames := 0, 0
	halfClosed := false
	for {
		rec.mu.Lock()
		avail, eoa := len(rec.audio)/2-consumed, rec.eoa
		rec.mu.Unlock()
		if !realtime && (avail < spb || waitEOA) && !eoa && !halfClosed {
			select { // wait for more audio
			case _, ok := <-arrived:
				if !ok {
					halfClosed = true
					if err := <-readErr; err != io.EOF {
						return err
					}
				}
			case <-ctx.Done():
				return ctx.Err()
			}
			continue
		}
		if !realtime && avail == 0 && (eoa || halfClosed) {
			reason := pb.EndReason_END_REASON_END_OF_AUDIO
			if !eoa {
				reason = pb.EndReason_END_REASON_CLIENT_CLOSED
			}
			return st.Send(endResp(reason))
		}
		if realtime {
			select {
			case <-time.After(fleetTick):
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		n := min(avail, spb)
		data := make([]byte, 2*spb)
		rec.mu.Lock()
		copy(data, rec.audio[2*consumed:2*(consumed+n)])
		rec.mu.Unlock()
		consumed += n
		if err := st.Send(&pb.StreamResponse{Message: &pb.StreamResponse_Audio{Audio: &pb.AudioOut{
			BlockIndex: uint32(block), Data: data, Silent: n == 0, RealSamples: uint32(n),
			SourceEndSample: uint64(consumed)}}}); err != nil {
			return err
		}
		for k := uint64(0); k < fleetFPB; k++ {
			idx := block*fleetFPB + k
			if err := st.Send(&pb.StreamResponse{Message: &pb.StreamResponse_Frame{Frame: &pb.VideoFrame{
				Index: idx, BlockIndex: uint32(block), Data: []byte{byte(idx)}}}}); err != nil {
				return err
			}
			frames++
			switch frames {
			case failAfter:
				return status.Error(codes.Unavailable, "the replica went away")
			case stallAfter:
				<-ctx.Done() // frozen: nothing more, until the client gives up on the stream
				return ctx.Err()
			case shutdownAfter:
				return st.Send(endResp(pb.EndReason_END_REASON_SERVER_SHUTDOWN))
			}
		}
		block++
	}
}

// frozenListener accepts TCP connections and never answers (no HTTP/2), like a frozen process.
func frozenListener(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	})
	return lis.Addr().String()
}
