"""GPU correctness check of the clustered-decode kernel against its PyTorch reference (run on a CUDA machine)."""
import torch; from chai.kernels import clustered_decode as kd
g=torch.Generator().manual_seed(0); B,H,C,S,D=4,32,8,4224,128
q=torch.randn(B,H,1,D,generator=g).half().cuda(); k=torch.randn(B,C,S,D,generator=g).half().cuda(); v=torch.randn(B,H,S,D,generator=g).half().cuda()
lab=torch.stack([torch.randperm(H,generator=g)%C for _ in range(B)]).cuda(); reps=torch.stack([torch.stack([(lab[b]==c).nonzero()[0,0] for c in range(C)]) for b in range(B)])
kv=torch.tensor(3001,device='cuda'); o=kd.clustered_decode_attention(q,k,v,lab,reps,D**-0.5,kv); r=kd.clustered_attention_reference(q,k,v,lab,reps,D**-0.5,kv_len=kv)
print("kernel max abs diff", (o.float()-r.float()).abs().max().item())
