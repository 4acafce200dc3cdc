//go:build !linux

package avatarforcing_test

import "os/exec"

func configureServerProcess(cmd *exec.Cmd) {}

func killServerProcess(cmd *exec.Cmd) { _ = cmd.Process.Kill() }
