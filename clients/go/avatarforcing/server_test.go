package avatarforcing_test

// The end-to-end tests run against the real Python server, which TestMain's helpers start on a
// free port the first time an end-to-end test asks for it, and kill at the end of the run. Most
// tests share one server (serverAddr); a test that needs other server flags asks serverWith for
// a server started with them (one per distinct set of flags, shared the same way).
//
//	AVATARFORCING_PYTHON  the interpreter of a venv with the server installed (default:
//	                      ../../.venv/bin/python; relative paths are relative to clients/go).
//
// When that interpreter does not exist the end-to-end tests are skipped, with a message; when
// it exists but the server does not come up within serverStartTimeout they fail. -short skips
// them too.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

const serverStartTimeout = 120 * time.Second

var (
	// repoRoot is the repository root (clients/go/avatarforcing -> ../../..).
	repoRoot = func() string {
		_, file, _, _ := runtime.Caller(0)
		return filepath.Clean(filepath.Join(filepath.Dir(file), "..", "..", ".."))
	}()
	speechWAV = filepath.Join(repoRoot, "avatarforcing", "assets", "speech_16k.wav")
	facePNG   = filepath.Join(repoRoot, "avatarforcing", "assets", "reference_face.png")
)

type testServer struct {
	args    []string // flags after the defaults (argparse: a later flag wins)
	once    sync.Once
	cmd     *exec.Cmd
	addr    string
	logPath string
	err     error
	skip    string
	done    chan struct{}
}

var (
	serversMu sync.Mutex
	servers   = map[string]*testServer{} // by their extra flags
)

func TestMain(m *testing.M) {
	code := m.Run()
	serversMu.Lock()
	for _, s := range servers {
		s.stop()
	}
	serversMu.Unlock()
	os.Exit(code)
}

// pythonPath resolves AVATARFORCING_PYTHON: a bare name is looked up on PATH, a relative path
// is taken relative to clients/go (the module root), as the default is.
func pythonPath() string {
	p := os.Getenv("AVATARFORCING_PYTHON")
	switch {
	case p == "":
		return filepath.Join(repoRoot, ".venv", "bin", "python")
	case !strings.ContainsRune(p, filepath.Separator):
		if found, err := exec.LookPath(p); err == nil {
			return found
		}
		return p
	case filepath.IsAbs(p):
		return p
	default:
		return filepath.Join(repoRoot, "clients", "go", p)
	}
}

// serverAddr returns the address of the shared Python server, starting it on first use.
func serverAddr(t *testing.T) string {
	t.Helper()
	return serverWith(t)
}

// serverWith returns the address of a Python server started with the default flags followed
// by extra (for example "--idle-timeout", "0.6"), starting it on first use; tests that pass
// the same flags share it.
func serverWith(t *testing.T, extra ...string) string {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test skipped with -short")
	}
	key := strings.Join(extra, "\x00")
	serversMu.Lock()
	srv := servers[key]
	if srv == nil {
		srv = &testServer{args: extra}
		servers[key] = srv
	}
	serversMu.Unlock()
	srv.once.Do(srv.start)
	if srv.skip != "" {
		t.Skip(srv.skip)
	}
	if srv.err != nil {
		t.Fatal(srv.err)
	}
	select {
	case <-srv.done:
		t.Fatalf("the Python server exited; its log:\n%s", srv.logTail())
	default:
	}
	return srv.addr
}

func (s *testServer) start() {
	py := pythonPath()
	if _, err := os.Stat(py); err != nil {
		s.skip = fmt.Sprintf("no Python interpreter at %s (set AVATARFORCING_PYTHON to a venv with the server installed): %v", py, err)
		return
	}
	port, err := freePort()
	if err != nil {
		s.err = err
		return
	}
	s.addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	logf, err := os.CreateTemp("", "avatarforcing-server-*.log")
	if err != nil {
		s.err = err
		return
	}
	s.logPath = logf.Name()
	args := append([]string{"-m", "avatarforcing_tools.cli", "serve",
		"--host", "127.0.0.1", "--port", strconv.Itoa(port), "--metrics-port", "-1",
		"--max-sessions", "4", "--log-level", "warning"}, s.args...)
	cmd := exec.Command(py, args...)
	cmd.Dir = repoRoot
	cmd.Stdout, cmd.Stderr = logf, logf
	configureServerProcess(cmd)
	if err := cmd.Start(); err != nil {
		logf.Close()
		s.err = fmt.Errorf("starting the Python server: %w", err)
		return
	}
	logf.Close()
	s.cmd = cmd
	s.done = make(chan struct{})
	go func() { _ = cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(serverStartTimeout)
	for {
		c, err := net.DialTimeout("tcp", s.addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-s.done:
			s.err = fmt.Errorf("the Python server exited before accepting connections; its log:\n%s", s.logTail())
			return
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			s.err = fmt.Errorf("the Python server did not accept connections on %s within %v; its log:\n%s",
				s.addr, serverStartTimeout, s.logTail())
			return
		}
	}
}

func (s *testServer) stop() {
	if s.cmd == nil || s.cmd.Process == nil {
		return
	}
	select {
	case <-s.done:
	default:
		killServerProcess(s.cmd)
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
		}
	}
	s.cmd = nil
	if s.logPath != "" {
		os.Remove(s.logPath)
	}
}

// killServer kills -9 the server a test started at addr, as a crash would.
func killServer(t *testing.T, addr string) {
	t.Helper()
	serversMu.Lock()
	var srv *testServer
	for _, s := range servers {
		if s.addr == addr {
			srv = s
		}
	}
	serversMu.Unlock()
	if srv == nil || srv.cmd == nil {
		t.Fatalf("no server of this test run listens on %s", addr)
	}
	killServerProcess(srv.cmd)
	select {
	case <-srv.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("the server on %s did not die", addr)
	}
}

func (s *testServer) logTail() string {
	b, _ := os.ReadFile(s.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(bytes.TrimSpace(b))
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// testCtx is a context bounded so that a hung test fails instead of hanging the run.
func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
