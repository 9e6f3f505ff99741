//! Between Burn's fusion graph and the CubeCL backend under it: a fusion tensor is
//! resolved (its pending operations run) into a `CubeTensor`, and a kernel's output is
//! registered back as a fusion tensor, like `from_data` does.

use burn::tensor::{Int, Tensor, TensorPrimitive};
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::OperationStreams;
use burn_fusion::{get_client, Fusion, NoOp};
use burn_ir::{BackendIr, InitOperationIr, OperationIr};

/// The CubeCL backend under a fusion backend.
pub type Inner<R, F, I, BT> = CubeBackend<R, F, I, BT>;
/// Burn's `Wgpu` / `Cuda`.
pub type Fused<R, F, I, BT> = Fusion<Inner<R, F, I, BT>>;

pub fn float_to_cube<R, F, I, BT, const D: usize>(t: Tensor<Fused<R, F, I, BT>, D>) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let primitive = t.into_primitive().tensor();
    let client = primitive.client.clone();
    client.resolve_tensor_float::<Inner<R, F, I, BT>>(primitive)
}

pub fn int_to_cube<R, F, I, BT, const D: usize>(
    t: Tensor<Fused<R, F, I, BT>, D, Int>,
) -> CubeTensor<R>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let primitive = t.into_primitive();
    let client = primitive.client.clone();
    client.resolve_tensor_int::<Inner<R, F, I, BT>>(primitive)
}

pub fn float_from_cube<R, F, I, BT, const D: usize>(
    t: CubeTensor<R>,
    device: &burn::tensor::Device<Fused<R, F, I, BT>>,
) -> Tensor<Fused<R, F, I, BT>, D>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let handle = <Inner<R, F, I, BT> as BackendIr>::float_tensor_handle(t.clone());
    let tensor = register::<R, F, I, BT>(&t, handle, device);
    Tensor::from_primitive(TensorPrimitive::Float(tensor))
}

pub fn int_from_cube<R, F, I, BT, const D: usize>(
    t: CubeTensor<R>,
    device: &burn::tensor::Device<Fused<R, F, I, BT>>,
) -> Tensor<Fused<R, F, I, BT>, D, Int>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let handle = <Inner<R, F, I, BT> as BackendIr>::int_tensor_handle(t.clone());
    Tensor::from_primitive(register::<R, F, I, BT>(&t, handle, device))
}

/// Registers a kernel's output with the fusion client of `device`, as `from_data` does.
fn register<R, F, I, BT>(
    t: &CubeTensor<R>,
    handle: <Inner<R, F, I, BT> as BackendIr>::Handle,
    device: &burn::tensor::Device<Fused<R, F, I, BT>>,
) -> burn::tensor::ops::FloatTensor<Fused<R, F, I, BT>>
where
    R: CubeRuntime,
    F: FloatElement,
    I: IntElement,
    BT: BoolElement,
{
    let client = get_client::<Inner<R, F, I, BT>>(device);
    let desc = InitOperationIr::create(t.meta.shape().clone(), t.dtype, || {
        client.register_tensor_handle(handle)
    });
    let mut outputs = client.register(
        OperationStreams::default(),
        OperationIr::Init(desc),
        NoOp::<Inner<R, F, I, BT>>::new(),
    );
    outputs.remove(0)
}
