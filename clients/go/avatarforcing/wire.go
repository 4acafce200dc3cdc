package avatarforcing

import (
	"google.golang.org/protobuf/proto"

	pb "github.com/avatarforcing/serve/clients/go/avatarforcingv1"
)

// The wire constants, read from the options of avatarforcing.proto (where they are defined
// once for the server and every SDK).
var (
	fileOptions = pb.File_avatarforcing_v1_avatarforcing_proto.Options()

	// ownerAddressKey is the trailer of FAILED_PRECONDITION naming the replica that owns a session.
	ownerAddressKey = proto.GetExtension(fileOptions, pb.E_OwnerAddressTrailer).(string)
	// retryAfterKey is the trailer of RESOURCE_EXHAUSTED/UNAVAILABLE: milliseconds to wait.
	retryAfterKey = proto.GetExtension(fileOptions, pb.E_RetryAfterTrailer).(string)

	// MinSampleRate and MaxSampleRate bound SessionOptions.SampleRate.
	MinSampleRate = int(proto.GetExtension(fileOptions, pb.E_MinSampleRateHz).(uint32))
	MaxSampleRate = int(proto.GetExtension(fileOptions, pb.E_MaxSampleRateHz).(uint32))

	// SupportedSampleRates are the usual rates; any other in MinSampleRate..MaxSampleRate with a
	// whole number of samples per frame is taken too.
	SupportedSampleRates = func() []int {
		var out []int
		for _, r := range proto.GetExtension(fileOptions, pb.E_CommonSampleRatesHz).([]uint32) {
			out = append(out, int(r))
		}
		return out
	}()
)

// grpcPushbackKey is gRPC's own retry pushback trailer; the server sets it equal to retryAfterKey.
const grpcPushbackKey = "grpc-retry-pushback-ms"
