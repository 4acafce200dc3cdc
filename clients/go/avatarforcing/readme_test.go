package avatarforcing_test

import (
	"os"
	"strings"
	"testing"
)

// TestREADMEExample checks that the README's example program is the one Example compiles:
// the README's import block and the body of its main function must appear verbatim in
// example_test.go (as the imports and the body of Example).
func TestREADMEExample(t *testing.T) {
	readme := readText(t, "../README.md")
	example := readText(t, "example_test.go")

	const marker = "<!-- snippet: the body of Example in avatarforcing/example_test.go"
	i := strings.Index(readme, marker)
	if i < 0 {
		t.Fatalf("README.md has no snippet marker %q", marker)
	}
	rest := readme[i:]
	start := strings.Index(rest, "```go\n")
	if start < 0 {
		t.Fatal("no ```go block after the snippet marker")
	}
	rest = rest[start+len("```go\n"):]
	end := strings.Index(rest, "```")
	if end < 0 {
		t.Fatal("the README's go block is not closed")
	}
	program := rest[:end]

	imports := between(t, program, "import (\n", "\n)\n")
	if !strings.Contains(example, "import (\n"+imports+"\n)\n") {
		t.Errorf("the README's imports differ from example_test.go's:\n%s", imports)
	}
	body := between(t, program, "func main() {\n", "\n}\n")
	if !strings.Contains(example, "func Example() {\n"+body+"\n}\n") {
		t.Errorf("the body of main in README.md differs from the body of Example in example_test.go; "+
			"make them identical. README body:\n%s", body)
	}
}

func readText(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.ReplaceAll(string(b), "\r\n", "\n")
}

func between(t *testing.T, s, open, close string) string {
	t.Helper()
	i := strings.Index(s, open)
	if i < 0 {
		t.Fatalf("%q not found in the README's program", open)
	}
	s = s[i+len(open):]
	j := strings.LastIndex(s, close)
	if j < 0 {
		t.Fatalf("%q not found in the README's program", close)
	}
	return s[:j]
}
