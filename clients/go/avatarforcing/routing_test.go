package avatarforcing_test

import (
	"net"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/avatarforcing/serve/clients/go/avatarforcing"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// startRedis runs a real redis-server (the Debian package) on a free loopback port.
func startRedis(t *testing.T) string {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test skipped with -short")
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Skip("redis-server is not installed (scripts/bootstrap.sh installs the Debian package)")
	}
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "",
		"--appendonly", "no", "--dir", t.TempDir())
	configureServerProcess(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { killServerProcess(cmd); _ = cmd.Wait() })
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	for deadline := time.Now().Add(20 * time.Second); ; {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("redis-server did not listen on %s", addr)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return "redis://" + addr + "/0"
}

// Two one-slot replicas share a Redis: sessions started through replica A spread over both
// (the second one is placed on B and streamed there), and a third is refused with a retry hint.
func TestE2EPlacementAcrossReplicas(t *testing.T) {
	url := startRedis(t)
	a := serverWith(t, "--redis-url", url, "--node-id", "go-a", "--max-sessions", "1")
	b := serverWith(t, "--redis-url", url, "--node-id", "go-b", "--max-sessions", "1")
	c := dialAddr(t, a)
	waitFreeSlots(t, dialAddr(t, b))
	ctx := testCtx(t, 60*time.Second)
	face := readFile(t, facePNG)
	nodes := map[string]bool{}
	for i := 0; i < 2; i++ {
		s, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
		if err != nil {
			t.Fatalf("session %d: %v", i, err)
		}
		defer s.Close()
		go func() {
			for range s.Events() {
			}
		}()
		nodes[s.Started().GetNodeId()] = true
		if s.Started().GetSessionId() == "" {
			t.Fatal("no session id")
		}
	}
	if !nodes["go-a"] || !nodes["go-b"] {
		t.Fatalf("sessions ran on %v, want one on each replica", nodes)
	}
	_, err := c.StartSession(ctx, avatarforcing.SessionOptions{Image: face})
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("third session with both replicas full: err = %v, want ResourceExhausted", err)
	}
	if wait, ok := avatarforcing.RetryAfter(err); !ok || wait <= 0 {
		t.Fatalf("RetryAfter = %v, %v; want a positive hint", wait, ok)
	}
}
