package avatarforcing_test

import (
	"os/exec"
	"syscall"
)

// The server runs in its own process group, which is killed as a whole, and dies with the
// test binary should that crash.
func configureServerProcess(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
}

func killServerProcess(cmd *exec.Cmd) {
	_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
}
